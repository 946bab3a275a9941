"""Session fixtures shared across the test tree: real images, and a tiny model directory.

The images are the CIFAR-10 sample shipped in tests/data/ (no download, no data outside the
repository). Both are built once and kept under `.cache/tests/`, keyed by what they are built
from (the sample's bytes; the source of the model, exporter and model-card code), so a later
session reuses them and any change to that code rebuilds them.
"""

import hashlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "cifar10-test-sample.npz"  # see tests/data/README.md
CACHE = ROOT / ".cache" / "tests"
PER_CLASS = 12


def cached_dir(name: str, key_parts: list[bytes], build: Callable[[Path], None]) -> Path:
    """`build(dir)` once per key; concurrent sessions race harmlessly (rename is atomic)."""
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    final = CACHE / f"{name}-{key}"
    if not final.exists():
        tmp = CACHE / f".{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_sample(out: Path, per_class: int | None = None) -> None:
    """The shipped CIFAR-10 JPEGs (bytes unchanged) as an ImageFolder: class/NNNN.jpg; the first
    `per_class` of each class, or all."""
    with np.load(SAMPLE) as f:
        jpeg, offsets, labels, classes = f["jpeg"], f["offsets"], f["labels"], f["classes"]
    counts: dict[int, int] = {}
    for i, y in enumerate(labels.tolist()):
        n = counts.get(y, 0)
        if per_class is not None and n >= per_class:
            continue
        (out / classes[y]).mkdir(exist_ok=True)
        (out / classes[y] / f"{n:04d}.jpg").write_bytes(jpeg[offsets[i] : offsets[i + 1]])
        counts[y] = n + 1


@pytest.fixture(scope="session")
def cifar_sample() -> Path:
    """An ImageFolder directory (class/NNNN.jpg) of all 2,100 shipped CIFAR-10 test images
    (210 per class; tests/data/README.md). Read-only."""
    return cached_dir("cifar-sample", [SAMPLE.read_bytes()], write_sample)


@pytest.fixture(scope="session")
def image_folder() -> Path:
    """The first PER_CLASS images of each class of the shipped CIFAR-10 sample (class/NNNN.jpg,
    10 classes of 32x32 JPEGs). Read-only."""
    return cached_dir("cifar-subset", [SAMPLE.read_bytes(), str(PER_CLASS).encode()],
                      lambda out: write_sample(out, PER_CLASS))


@pytest.fixture(scope="session")
def image_bytes(image_folder) -> dict[str, list[bytes]]:
    """Class name -> the encoded images of `image_folder`."""
    return {d.name: [p.read_bytes() for p in sorted(d.iterdir())]
            for d in sorted(image_folder.iterdir())}


def export_tiny_model(out: Path, images: Path) -> None:
    """Export a randomly initialised preact_resnet_small through a checkpoint like a run's."""
    import torch

    from byorl.training.config import TrainConfig
    from byorl.training.export import export_encoder
    from byorl.training.models import create_model

    torch.manual_seed(0)
    encoder = create_model("preact_resnet_small")
    config = TrainConfig()
    config.model.arch, config.model.width = "preact_resnet_small", 1
    config.data.source = str(images)
    online = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    ckpt = out / "checkpoint.pt"
    torch.save({"config": config.to_dict(), "online": online, "step": 0}, ckpt)
    export_encoder(ckpt, out, images=str(images), command="tests/conftest.py")
    ckpt.unlink()


@pytest.fixture(scope="session")
def model_dir(image_folder) -> Path:
    """A model directory (encoder.onnx, encoder.pt, card.json) of a randomly initialised
    preact_resnet_small, made by the project's exporter (with its parity check). Read-only."""
    import onnxruntime
    import torch

    sources = [ROOT / f for f in ("training/models.py", "training/export.py",
                                  "training/checkpoint.py", "byorl/model_dir.py")]
    key = [p.read_bytes() for p in sources] + [torch.__version__.encode(),
                                               onnxruntime.__version__.encode()]
    return cached_dir("tiny-model", key, lambda out: export_tiny_model(out, image_folder))


def resnet18_stem_onnx() -> bytes:
    """An encoder from outside the project's registry: torchvision's resnet18 (randomly
    initialised, nothing downloaded) cut after its first stage and pooled, normalisation inside,
    exported to ONNX (dynamic batch) with PyTorch's default exporter: 64-d vectors of 32x32
    images."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1,
                                            net.avgpool, torch.nn.Flatten())

        def forward(self, x):
            return self.body((x - 0.5) / 0.25)

    program = torch.onnx.export(Stem().eval(), (torch.rand(2, 3, 32, 32),), input_names=["x"],
                                output_names=["vector"], dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.model_proto.SerializeToString()


def flatten_onnx(op: str | None = None, batch: int | str = "N", side: int = 8, **attrs) -> bytes:
    """A hand-built ONNX encoder: pixels flattened (3*side*side numbers), then `op` if given
    (LpNormalization: an op ONNX Runtime runs and onnx2torch cannot convert)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3 * side * side])
    nodes = [helper.make_node("Flatten", ["x"], ["f" if op else "y"], axis=1)]
    if op:
        nodes.append(helper.make_node(op, ["f"], ["y"], **attrs))
    graph = helper.make_graph(nodes, "flatten", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@pytest.fixture(scope="session")
def user_onnx(tmp_path_factory) -> Path:
    """`resnet18_stem_onnx` as a file."""
    path = tmp_path_factory.mktemp("user-model") / "stem.onnx"
    path.write_bytes(resnet18_stem_onnx())
    return path


def forward_only(module):
    """`module` behind a wall no gradient passes: what a black-box attack gets to query."""
    import torch

    class ForwardOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            with torch.no_grad():
                return self.inner(x)

    return ForwardOnly()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> str:
    """One private PostgreSQL server for the session (its URL); each test that uses it takes a
    database of its own (`fresh_database`)."""
    from tests.live import kill_group, start_postgres

    url, proc, root = start_postgres(tmp_path_factory.mktemp("postgres") / "postgres.log")
    yield url
    kill_group(proc, signal.SIGTERM)
    shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server at `server_url`: its URL."""
    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The service's database (a `BYORL_DATABASE_URL`, empty for the embedded SQLite) on each
    back-end: store tests run unchanged against both."""
    if request.param == "sqlite":
        return ""
    return fresh_database(request.getfixturevalue("postgres"))


@pytest.fixture
def service_db(database_url, tmp_path):
    """The service's database on each back-end (SQLite in `tmp_path`, or PostgreSQL)."""
    from byorl.service.settings import Settings
    from byorl.service.storage.database import Database

    db = Database(Settings(data_dir=tmp_path, database_url=database_url).database())
    yield db
    db.close()


@pytest.fixture(scope="session")
def milvus(tmp_path_factory) -> str:
    """One Milvus standalone server for the session (its URI): each test isolates its galleries
    by a collection prefix of its own (`milvus_settings`). BYORL_TEST_MILVUS_URI names a server
    already running instead (one per machine: it binds fixed ports); without it the server is
    started here, and a server that cannot start fails the test that needs it, saying why."""
    if uri := os.environ.get("BYORL_TEST_MILVUS_URI"):
        yield uri
        return
    from tests.live import start_milvus

    root = tmp_path_factory.mktemp("milvus")
    uri, server = start_milvus(root)
    yield uri
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def milvus_settings(uri: str, data_dir: Path, database_url: str = "", **more):
    """Settings of a service whose galleries are on the Milvus server at `uri`, under a
    collection prefix of their own."""
    from byorl.service.settings import Settings

    return Settings(data_dir=data_dir, milvus_uri=uri, database_url=database_url,
                    milvus_prefix=f"t{uuid.uuid4().hex[:10]}_", **more)
