"""Session fixtures shared across the test tree: a few real images, and a tiny model directory.

Both are built once and kept under `.cache/tests/`, keyed by what they are built from (the
archive's size and mtime; the source of the model, exporter and model-card code), so a later
session reuses them and any change to that code rebuilds them.
"""

import hashlib
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "../shared/data/cifar10-jpeg.tar.gz"
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


def _write_cifar_subset(out: Path) -> None:
    """The first PER_CLASS JPEGs of each class in the shared CIFAR-10 archive."""
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3 and counts.get(parts[1], 0) < PER_CLASS:
                (out / parts[1]).mkdir(exist_ok=True)
                (out / parts[1] / f"{counts.get(parts[1], 0):04d}.jpg").write_bytes(
                    tar.extractfile(m).read())
                counts[parts[1]] = counts.get(parts[1], 0) + 1


def _write_generated(out: Path, classes: int = 10) -> None:
    """Stand-in images when the shared data is absent: one noisy colour per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(0, 256, 3)
        (out / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            px = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(out / f"class{c}" / f"{i:04d}.png")


@pytest.fixture(scope="session")
def image_folder() -> Path:
    """An ImageFolder directory (class/NNNN.ext, 10 classes of 32x32 images): real CIFAR-10
    images when the shared archive is present, generated ones otherwise. Read-only."""
    if CIFAR.exists():
        st = CIFAR.stat()
        return cached_dir("cifar-subset", [f"{st.st_size}:{st.st_mtime_ns}:{PER_CLASS}".encode()],
                          _write_cifar_subset)
    return cached_dir("generated-images", [str(PER_CLASS).encode()], _write_generated)


@pytest.fixture(scope="session")
def image_bytes(image_folder) -> dict[str, list[bytes]]:
    """Class name -> the encoded images of `image_folder`."""
    return {d.name: [p.read_bytes() for p in sorted(d.iterdir())]
            for d in sorted(image_folder.iterdir())}


def export_tiny_model(out: Path, images: Path) -> None:
    """Export a randomly initialised preact_resnet_small through a checkpoint like a run's."""
    import torch

    from training.config import TrainConfig
    from training.export import export_encoder
    from training.models import create_model

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
                                  "training/checkpoint.py", "index/model_card.py")]
    key = [p.read_bytes() for p in sources] + [torch.__version__.encode(),
                                               onnxruntime.__version__.encode()]
    return cached_dir("tiny-model", key, lambda out: export_tiny_model(out, image_folder))
