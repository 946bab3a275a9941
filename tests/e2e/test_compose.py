"""The docker-compose topology, validated with the compose client (no Docker engine needed).

The e2e tests run the same topology natively (redis-server, celery worker, uvicorn)."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCALE = {"postgres", "etcd", "minio", "milvus", "api-scale", "worker-scale", "nginx"}


@pytest.fixture(scope="module")
def config() -> dict:
    """`docker-compose config`: the file as the compose client resolves it."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: `make setup` installs it (apt-get)"
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_is_valid_and_complete(config):
    services = config["services"]
    assert set(services) == {"redis", "api", "worker", "api-gpu", "worker-gpu", *SCALE}
    assert {n for n, s in services.items() if "gpu" in s.get("profiles", [])} == {
        "api-gpu", "worker-gpu"}  # started only with --profile gpu
    assert {n for n, s in services.items() if "scale" in s.get("profiles", [])} == SCALE
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name in ("api", "worker"):
        s = services[name]
        env = s["environment"]
        assert env["BYORL_REDIS_URL"] == "redis://redis:6379/0"
        assert f"data:{env['BYORL_DATA_DIR']}:rw" in s["volumes"]  # one shared data volume
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (ROOT / s["build"]["dockerfile"]).is_file()
    assert "data" in config["volumes"]


def test_scale_profile_shares_state_and_balances_the_replicas(config):
    """`--profile scale`: api and worker replicas on one PostgreSQL, one Milvus (on its etcd and
    MinIO), one Redis and the data volume (write-once files), each waiting for all of them to
    be healthy; nginx in front of the api replicas, re-resolving them as they are scaled."""
    services = config["services"]
    for name in ("api-scale", "worker-scale"):
        s = services[name]
        env = s["environment"]
        assert env["BYORL_DATABASE_URL"].startswith("postgresql://byorl:")
        assert env["BYORL_DATABASE_URL"].endswith("@postgres:5432/byorl")
        assert env["BYORL_MILVUS_URI"] == "http://milvus:19530"
        assert env["BYORL_REDIS_URL"] == "redis://redis:6379/0"
        assert f"data:{env['BYORL_DATA_DIR']}:rw" in s["volumes"]
        assert {n: d["condition"] for n, d in s["depends_on"].items()} == {
            "redis": "service_healthy", "postgres": "service_healthy",
            "milvus": "service_healthy"}
        assert "ports" not in s  # reached through nginx only: replicas share no host port
    assert services["milvus"]["image"] == "milvusdb/milvus:v2.3.5"
    assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "byorl"
    nginx = services["nginx"]
    conf_mount = next(v for v in nginx["volumes"] if v.endswith("default.conf:ro"))
    conf = (DOCKER / "nginx.conf").read_text()
    assert conf_mount.startswith(str(DOCKER / "nginx.conf"))
    assert "resolver 127.0.0.11" in conf and "set $api http://api-scale:8000;" in conf
    assert "proxy_pass $api;" in conf  # a variable: resolved again, so new replicas are seen
    assert nginx["ports"] == [{"published": 8000, "target": 8000}]


def test_gpu_profile_reserves_a_gpu(config):
    services = config["services"]
    for name in ("api-gpu", "worker-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()


def test_api_images_install_no_torch_and_worker_images_do():
    for name in ("Dockerfile.api", "Dockerfile.api-gpu"):
        text = (DOCKER / name).read_text()
        assert "[train" not in text and "torch==" not in text
        assert "! pip show torch" in text  # the build fails if anything pulled PyTorch in
    for name, extra in (("Dockerfile.worker", "cpu"), ("Dockerfile.worker-gpu", "gpu")):
        assert f".[{extra},train,service]" in (DOCKER / name).read_text()


def test_cpu_and_gpu_installs_never_mix():
    """faiss-cpu/faiss-gpu and onnxruntime/onnxruntime-gpu each share one module name: the base
    install holds neither, the `cpu` and `gpu` extras one of each, and every image takes
    exactly one of the two extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}

    assert not names(project["dependencies"]) & {"faiss-cpu", "onnxruntime"}
    assert names(extras["cpu"]) == {"faiss-cpu", "onnxruntime"}
    assert names(extras["gpu"]) == {"faiss-gpu-cu12", "onnxruntime-gpu"}
    for extra, others in extras.items():
        if extra not in ("cpu", "gpu"):
            assert not names(others) & (names(extras["cpu"]) | names(extras["gpu"])), extra
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        gpu = dockerfile.name.endswith("-gpu")
        assert ("[gpu," in text, "[cpu," in text) == (gpu, not gpu), dockerfile.name


def test_gpu_images_have_the_cuda_of_the_builds_they_install():
    """The GPU base images' CUDA is torch 2.14.1's (the pinned wheel's torch.version.cuda,
    here the installed one), and check_cuda.py, run in the image build, refuses a mismatch."""
    import torch

    for name in ("Dockerfile.worker-gpu", "Dockerfile.api-gpu"):
        base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.", (DOCKER / name).read_text(), re.M)
        assert base and base.group(1) == torch.version.cuda, name
    check = [sys.executable, str(DOCKER / "check_cuda.py")]
    ok = subprocess.run(check, env={"CUDA_VERSION": f"{torch.version.cuda}.0"},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(check, env={"CUDA_VERSION": "12.6.3"}, capture_output=True, text=True)
    assert wrong.returncode == 1 and "torch" in wrong.stderr and "12.6" in wrong.stderr


def test_images_install_the_whole_package_and_run_it_by_its_byorl_paths(config):
    """Each image copies every folder pyproject maps into `byorl`, installs it from /src and
    runs from /app (where no source folder shadows the installed package), naming the apps
    `byorl.service.main:app` and `byorl.service.worker`, as the compose health check does."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"].values()
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        for folder in folders:
            assert f"COPY {folder} ./{folder}\n" in text, (dockerfile.name, folder)
        assert text.index("WORKDIR /src") < text.index("pip install \".[") < text.rindex(
            "WORKDIR /app"), dockerfile.name
        apps = re.findall(r"(?:uvicorn\"?, \"|-A\"?,? \"?)([\w.:]+)", text)
        expected = "byorl.service.main:app" if "api" in dockerfile.name else "byorl.service.worker"
        assert apps and set(apps) == {expected}, (dockerfile.name, apps)
    health = config["services"]["worker"]["healthcheck"]["test"]
    assert "celery -A byorl.service.worker inspect ping" in " ".join(health)
