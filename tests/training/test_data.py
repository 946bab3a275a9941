import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from byorl.service.serving.images import decode_image as service_decode
from byorl.service.settings import Settings
from byorl.training import data
from byorl.training.data import label_subset, load_images, load_unlabeled


@pytest.fixture
def split_archive(image_folder, tmp_path):
    """A .tar.gz laid out like the shared CIFAR-10: train/<class>/..., test/<class>/..."""
    root = tmp_path / "set"
    for cls in sorted(p.name for p in image_folder.iterdir()):
        files = sorted((image_folder / cls).iterdir())
        for split, chunk in (("train", files[:8]), ("test", files[8:])):
            (root / split / cls).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, root / split / cls / f.name)
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="set")
    return archive


def test_archive_splits_decode_to_uint8_and_cache(split_archive, tmp_path, monkeypatch):
    train = load_images(str(split_archive), "train", cache_dir=tmp_path / "cache")
    test = load_images(str(split_archive), "test", cache_dir=tmp_path / "cache")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert len(train) == 80 and len(test) == len(train.classes) * 4
    assert train.classes == test.classes and train.labels.bincount().tolist() == [8] * 10

    def no_decoding(*_):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "decode_image", no_decoding)
    again = load_images(str(split_archive), "train", cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_folder_resizes_and_extra_unlabeled(image_folder, tmp_path):
    small = load_images(str(image_folder), size=16, cache_dir=None)
    assert small.images.shape[1:] == (3, 16, 16)
    extra = load_unlabeled([str(image_folder), str(image_folder)], size=32, cache_dir=None)
    assert len(extra) == 2 * len(small)


def test_label_subsets_are_seeded_disjoint_and_sized():
    labeled, val = label_subset(50_000, 0.01, seed=0)
    assert len(val) == 1024 and len(labeled) == round(0.01 * (50_000 - 1024))
    assert not set(labeled.tolist()) & set(val.tolist())
    again, _ = label_subset(50_000, 0.01, seed=0)
    other, _ = label_subset(50_000, 0.01, seed=1)
    assert torch.equal(labeled, again) and not torch.equal(labeled, other)
    assert len(label_subset(50_000, 500)[0]) == 500
    assert len(label_subset(50_000, 1.0)[0]) == 50_000 - 1024
    with pytest.raises(ValueError, match="labels"):
        label_subset(2000, 5000)
    with pytest.raises(FileNotFoundError):
        load_images("/no/such/images", cache_dir=None)


def test_decode_image_shows_photos_upright_as_the_service_does():
    """A phone photo stored sideways (EXIF orientation 6) and an RGBA PNG decode to the pixels
    the service's decoder gives: galleries built offline match queries sent to the service."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), np.uint8)).save(sideways, "JPEG", exif=exif)
    rgba = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 4), np.uint8)).save(rgba, "PNG")
    settings = Settings(data_dir="unused")
    for blob in (sideways.getvalue(), rgba.getvalue()):
        np.testing.assert_array_equal(data.decode_image(blob, 32),
                                      service_decode(blob, 32, settings))
    assert data.decode_image(sideways.getvalue(), None).shape == (3, 40, 20)  # upright
