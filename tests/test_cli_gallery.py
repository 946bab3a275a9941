"""`byorl gallery import / export / restore` against real uvicorn servers (real sockets, ONNX
Runtime, FAISS, files): an import that meets bad files and duplicate keys, an interrupted one
resumed, and an export restored into a second server's fresh data directory."""

import asyncio
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import byorl.client
from byorl.cli import app
from byorl.client import AsyncClient, Client
from tests.live import kill_group, start_service

LIMITS = {"max_bulk_images": 64, "max_body_bytes": 2**20}


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Two services, each on its own fresh data directory."""
    started = [start_service(model_dir, tmp_path_factory.mktemp(f"server{i}"), api_key="",
                             **LIMITS) for i in range(2)]
    yield [url for url, _ in started]
    for _, proc in started:
        kill_group(proc)


def byorl_cli(*args: str):
    return CliRunner().invoke(app, ["gallery", *map(str, args)])


def image_tree(root, image_folder, per_class: int = 2, classes: int = 5) -> list[str]:
    """CIFAR JPEGs under class folders (+ one PNG two levels down); their keys."""
    keys = []
    for cls in sorted(image_folder.iterdir())[:classes]:
        for src in sorted(cls.iterdir())[:per_class]:
            (root / cls.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / cls.name / src.name)
            keys.append(f"{cls.name}/{src.name}")
    (root / "more" / "deep").mkdir(parents=True)
    Image.open(src).save(root / "more" / "deep" / "x.png")
    return sorted(keys + ["more/deep/x.png"])


def add_bad_files(root, jpeg: bytes) -> list[str]:
    (root / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (root / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="BMP")
    (root / "old.bmp").write_bytes(buf.getvalue())
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: not a file of the gallery
    return ["broken.jpg", "notes.txt", "old.bmp"]


def test_an_import_skips_bad_files_and_present_keys_and_resumes(servers, image_folder,
                                                                tmp_path, monkeypatch):
    url = servers[0]
    root = tmp_path / "images"
    good = image_tree(root, image_folder)
    bad = add_bad_files(root, (root / good[0]).read_bytes())
    with Client(url) as c:
        c.create_gallery("imported")
        c.add("imported", {good[3]: root / good[3]})  # already there: a duplicate key

        # interrupted after its first batch of 4
        def stop(done, total, what):
            if done >= 4:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            c.import_images("imported", root, batch=4, progress=stop)
        before = c.keys("imported")
        assert good[3] in before and 4 <= len(before) < len(good)

    out = byorl_cli("import", root, "--index", "imported", "--url", url, "--batch", "4")
    assert out.exit_code == 0, out.output
    added = len(good) - len(before)
    assert (f"imported: {added} added, {len(before)} already present (skipped), 3 failed, "
            f"of {len(good) + 3} files") in out.output
    assert "failed broken.jpg: corrupt image" in out.output
    assert "failed notes.txt: not an image" in out.output
    assert "failed old.bmp: unsupported format BMP" in out.output
    with Client(url) as c:
        assert [i.key for i in c.items("imported")] == [
            good[3], *sorted(before - {good[3]}), *[k for k in good if k not in before]]
        # a key added behind the import's back (after it listed the gallery's keys): its batch
        # is refused whole (409), split, and the key counted as present; nothing stored twice
        monkeypatch.setattr(byorl.client, "keys", lambda gallery: (yield from ()) or set())
        summary = c.import_images("imported", root, batch=8)
        assert (summary.added, summary.present, [k for k, _ in summary.failed]) == (
            0, len(good), bad)
        assert c.gallery("imported").count == len(good)

    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=".")
    out = byorl_cli("import", archive, "--index", "from-tar", "--url", url, "--create")
    assert out.exit_code == 0 and f"{len(good)} added, 0 already" in out.output, out.output
    with Client(url) as c:
        assert c.keys("from-tar") == set(good)
        hit = c.search("from-tar", [root / good[5]], k=1)[0][0]
        assert hit.key == good[5] and hit.score == pytest.approx(1, abs=1e-4)


def test_an_import_that_can_do_nothing_exits_1(servers, tmp_path):
    url = servers[0]
    (tmp_path / "bad").mkdir()
    add_bad_files(tmp_path / "bad", b"\xff\xd8\xff\xe0" * 100)
    out = byorl_cli("import", tmp_path / "bad", "--index", "nothing", "--url", url, "--create")
    assert out.exit_code == 1 and "0 added, 0 already present (skipped), 3 failed" in out.output
    assert "nothing imported" in out.output
    (tmp_path / "empty").mkdir()
    assert byorl_cli("import", tmp_path / "empty", "--index", "nothing", "--url",
                     url).exit_code == 1
    out = byorl_cli("import", tmp_path / "bad", "--index", "missing", "--url", url)
    assert out.exit_code == 1 and "index_not_found" in out.output  # no --create
    assert byorl_cli("import", tmp_path / "nope", "--index", "x", "--url", url).exit_code == 2


def search_all(url: str, gallery: str, queries) -> list[list[tuple]]:
    with Client(url) as c:
        return [[(h.key, h.score, h.metadata) for h in row]
                for row in c.search(gallery, queries, k=6)]


def test_an_export_restored_on_a_fresh_server_searches_the_same(servers, image_folder,
                                                                tmp_path):
    first, second = servers
    root = tmp_path / "images"
    keys = image_tree(root, image_folder, per_class=8, classes=10)
    with Client(first) as c:
        c.create_gallery("source")
        c.add("source", {k: root / k for k in keys},
              metadata={k: {"class": k.split("/")[0], "n": i} for i, k in enumerate(keys)
                        if i % 4}, batch=32)
        c.remove("source", keys[7])
        card = c.models()[0]
    keys.remove(keys[7])
    out = tmp_path / "backup"
    r = byorl_cli("export", "source", out, "--url", first)
    assert r.exit_code == 0 and f"{len(keys)} items of source" in r.output, r.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("name", "model_id", "onnx_sha256", "factory", "dim",
                                     "count", "pixel_shape")} == {
        "name": "source", "model_id": card["model_id"], "onnx_sha256": card["onnx_sha256"],
        "factory": "Flat", "dim": 256, "count": len(keys), "pixel_shape": [3, 32, 32]}
    vectors, pixels = np.load(out / "vectors.npy"), np.load(out / "pixels.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (len(keys), 256)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(keys), 3, 32, 32)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted(i["key"] for i in items) == sorted(keys) and items[1]["metadata"]["n"] == 1
    np.testing.assert_array_equal(pixels[0], np.asarray(Image.open(root / items[0]["key"])
                                                        .convert("RGB")).transpose(2, 0, 1))

    # the fresh server: 80 items in requests of 256, halved on its 413s (64 items at most)
    assert len(keys) == 80
    r = byorl_cli("restore", out, "--index", "copy", "--url", second)
    assert r.exit_code == 0 and f"-> copy ({len(keys)} items)" in r.output, r.output
    queries = [root / k for k in keys[::5]]
    before, after = search_all(first, "source", queries), search_all(second, "copy", queries)
    assert [[h[0] for h in row] for row in before] == [[h[0] for h in row] for row in after]
    assert [[h[2] for h in row] for row in before] == [[h[2] for h in row] for row in after]
    np.testing.assert_allclose([[h[1] for h in row] for row in before],
                               [[h[1] for h in row] for row in after], atol=1e-5)
    with Client(second) as c:
        info = c.gallery("copy")
        assert (info.model_id, info.factory, info.count) == (card["model_id"], "Flat", len(keys))
        np.testing.assert_allclose(c.export_page("copy")["vectors"], vectors, atol=1e-6)
    r = byorl_cli("restore", out, "--index", "copy", "--url", second)  # resumed: nothing new
    assert r.exit_code == 0 and f"({len(keys)} items)" in r.output

    # the same plan through AsyncClient, and an export never overwrites a folder
    async def export_async():
        async with AsyncClient(second) as c:
            return await c.export_gallery("copy", tmp_path / "again")

    assert asyncio.run(export_async())["count"] == len(keys)
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "pixels.npy"), pixels)
    r = byorl_cli("export", "source", out, "--url", first)
    assert r.exit_code == 1 and "not an empty folder" in r.output


def test_a_restore_refuses_another_model(servers, image_folder, tmp_path):
    first, second = servers
    root = tmp_path / "images"
    keys = image_tree(root, image_folder, per_class=1)
    with Client(first) as c:
        c.create_gallery("small")
        c.add("small", {k: root / k for k in keys})
        c.export_gallery("small", tmp_path / "export")
    manifest_path = tmp_path / "export" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "onnx_sha256": "0" * 64}))
    r = byorl_cli("restore", tmp_path / "export", "--index", "refused", "--url", second)
    assert r.exit_code == 1 and "card hash" in r.output and "other weights" in r.output
    manifest_path.write_text(json.dumps({**manifest, "model_id": "someone-else"}))
    r = byorl_cli("restore", tmp_path / "export", "--index", "refused", "--url", second)
    assert r.exit_code == 1 and "does not serve" in r.output
    with Client(second) as c:
        assert "refused" not in [g.name for g in c.galleries()]  # nothing created
        # the service refuses it too, whatever a client checks
        with pytest.raises(byorl.client.ServiceError) as refused:
            c.create_gallery("other")
            c.add_vectors("other", ["a"], np.ones((1, 256)), np.zeros((1, 3, 32, 32)),
                          model_id=manifest["model_id"], onnx_sha256="1" * 64)
        assert (refused.value.status, refused.value.code) == (409, "model_hash_mismatch")
