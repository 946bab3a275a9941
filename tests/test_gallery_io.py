"""`byorl.gallery_io`: the files an import reads (folders, archives, keys, local checks) and the
export folder (its format, written page by page)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from byorl import gallery_io
from byorl.gallery_io import ExportError, ExportWriter, image_problem, open_source, read_export


def png(size=(16, 16), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_a_folder_and_its_archive_give_the_same_keys(tmp_path):
    root = tmp_path / "images"
    for rel in ("b.png", "cats/1.png", "cats/deep/2.png", ".hidden.png", ".git/x.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png())
    with open_source(root) as files:
        keys = [f.key for f in files]
        assert files[0].read() == png() and files[0].size == len(png())
    assert keys == ["b.png", "cats/1.png", "cats/deep/2.png"]
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=".")
    with open_source(archive) as files:
        assert sorted(f.key for f in files) == keys
        assert all(f.read() == png() for f in files)
    with pytest.raises(FileNotFoundError):
        with open_source(tmp_path / "nothing.zip"):
            pass


def test_files_the_service_would_refuse_are_named_before_any_request():
    assert image_problem("a.png", png()) is None
    assert image_problem("a.jpg", png(fmt="JPEG")) is None
    assert image_problem("a.webp", png(fmt="WEBP")) is None
    assert "unsupported format BMP" in image_problem("a.bmp", png(fmt="BMP"))
    assert "not an image" in image_problem("notes.txt", b"hello")
    assert "corrupt" in image_problem("cut.png", png()[:60])
    assert "too large" in image_problem("a.png", png(), max_bytes=10)
    assert "key longer" in image_problem("k" * 300, png())


def test_an_export_is_written_page_by_page_and_read_back(tmp_path):
    out = tmp_path / "export"
    writer = ExportWriter(out)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 4)).astype(np.float32)
    pixels = rng.integers(0, 256, (5, 3, 2, 2), dtype=np.uint8)
    items = [{"key": f"k{i}", "metadata": {"i": i} if i else None} for i in range(5)]
    for part in (slice(0, 3), slice(3, 5)):
        writer.write(items[part], vectors[part], pixels[part])
    assert not (out / gallery_io.MANIFEST).exists()  # incomplete until finished
    manifest = {"format": gallery_io.FORMAT, "version": gallery_io.VERSION, "dim": 4,
                "count": 5, "pixel_shape": [3, 2, 2]}
    writer.finish(manifest)
    assert sorted(p.name for p in out.iterdir()) == ["items.jsonl", "manifest.json",
                                                     "pixels.npy", "vectors.npy"]
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), vectors)  # plain numpy
    np.testing.assert_array_equal(np.load(out / "pixels.npy"), pixels)
    lines = (out / "items.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == items
    export = read_export(out)
    assert export.keys == [f"k{i}" for i in range(5)] and export.metadata[1] == {"i": 1}
    with pytest.raises(ExportError, match="not an empty folder"):
        ExportWriter(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "count": 6}))
    with pytest.raises(ExportError, match="manifest says 6"):
        read_export(out)
    with pytest.raises(ExportError, match="no manifest.json"):
        read_export(tmp_path)
