"""The docker-compose topology, validated with the compose client (no Docker engine needed).

The e2e tests run the same topology natively (redis-server, celery worker, uvicorn)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


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
    assert set(services) == {"redis", "api", "worker", "api-gpu", "worker-gpu"}
    assert {n for n, s in services.items() if "gpu" in s.get("profiles", [])} == {
        "api-gpu", "worker-gpu"}  # started only with --profile gpu
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
    for name in ("Dockerfile.worker", "Dockerfile.worker-gpu"):
        assert ".[train,service]" in (DOCKER / name).read_text()
