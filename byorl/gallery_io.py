"""Galleries to and from files, on the client's side (no service code): the image files of a
folder or tar archive for `byorl gallery import`, and the export folder that `byorl gallery
export` writes and `byorl gallery restore` reads. The requests are `byorl.client`'s plans
(`import_images`, `export_gallery`, `restore_gallery`).

Keys of imported files are their paths relative to the folder (or their member names in the
archive, without a leading "./"), with "/" between parts on every system: `cats/0001.jpg`.
Hidden files and folders (a part starting with ".") are left out.

An export is a folder that any numpy reads:

    manifest.json  format, gallery name, model_id, onnx_sha256 (the model card's hash),
                   factory, dim, count, pixel_shape, and the file names below; written last
                   (an export without it is incomplete)
    items.jsonl    one {"key": ..., "metadata": ...} per line, in the gallery's order
    vectors.npy    float32 (count, dim): the stored unit-length vectors, row i of item i
    pixels.npy     uint8 (count, 3, S, S): the model-input pixels each item was embedded from
"""

import io
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from byorl.files import atomic_write

FORMAT = "byorl-gallery-export"
VERSION = 1
MANIFEST, ITEMS, VECTORS, PIXELS = "manifest.json", "items.jsonl", "vectors.npy", "pixels.npy"
SERVICE_FORMATS = ("PNG", "JPEG", "WEBP")  # what the service decodes
MAX_KEY_CHARS = 256  # the service's key length
MAX_FILE_BYTES = 16 * 2**20  # a file larger than this is not sent (below MAX_BODY_BYTES)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class ExportError(Exception):
    """An export folder that cannot be written or restored (the message says why)."""


@dataclass(frozen=True)
class SourceFile:
    """One file to import: its key and how to read its bytes."""

    key: str
    size: int
    read: Callable[[], bytes]


@dataclass
class ImportSummary:
    """What an import did: files added, already in the gallery (skipped), and failed (key,
    reason) — a failed file never stops the others."""

    files: int = 0
    added: int = 0
    present: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def nothing_done(self) -> bool:
        """No file found, or every file failed: nothing is in the gallery that was asked for."""
        return self.added + self.present == 0


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TAR_SUFFIXES)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") for p in parts)


@contextmanager
def open_source(source: str | Path) -> Iterator[list[SourceFile]]:
    """The files of a folder (recursively, sorted by key) or of a tar archive (in archive
    order), each read only when asked (memory holds one batch, not the whole source)."""
    path = Path(source)
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                full = Path(dirpath) / name
                if name.startswith(".") or not full.is_file():
                    continue
                files.append(SourceFile(full.relative_to(path).as_posix(), full.stat().st_size,
                                        full.read_bytes))
        yield sorted(files, key=lambda f: f.key)
    elif is_archive(path):
        with tarfile.open(path, "r:*") as tar:
            files = []
            for member in tar.getmembers():
                key = member.name.removeprefix("./")
                if member.isfile() and key and not _hidden(tuple(key.split("/"))):
                    files.append(SourceFile(key, member.size,
                                            lambda m=member: tar.extractfile(m).read()))
            yield files
    else:
        raise FileNotFoundError(f"{source}: neither a folder nor a tar archive "
                                f"({', '.join(TAR_SUFFIXES)})")


def image_problem(key: str, data: bytes, max_bytes: int = MAX_FILE_BYTES) -> str | None:
    """Why a file cannot be added (checked here, before any request), or None: its key too
    long, its size, not an image the service decodes, or corrupt (fully decoded once)."""
    from PIL import Image

    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if len(data) > max_bytes:
        return f"too large: {len(data)} bytes (the limit is {max_bytes})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt not in SERVICE_FORMATS:
                return f"unsupported format {fmt} (the service takes PNG, JPEG, WebP)"
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"too large: {exc}"
    except Image.UnidentifiedImageError:
        return "not an image (unknown format)"
    except Exception as exc:  # Pillow raises many types for a truncated or corrupt file
        return f"corrupt image: {exc}"
    return None


class ExportWriter:
    """Writes an export page by page: items.jsonl as it goes, vectors and pixels appended to
    raw files that `finish` turns into .npy files (header, then the rows copied in chunks), so
    memory holds one page whatever the gallery's size."""

    def __init__(self, out: Path):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out} exists and is not an empty folder")
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.rows = out, 0
        self._items = open(out / ITEMS, "w", encoding="utf-8")  # noqa: SIM115
        self._raw = {name: open(out / f"{name}.part", "wb")  # noqa: SIM115
                     for name in (VECTORS, PIXELS)}

    def write(self, items: list[dict], vectors: np.ndarray, pixels: np.ndarray) -> None:
        for item in items:
            self._items.write(json.dumps({"key": item["key"], "metadata": item["metadata"]},
                                         ensure_ascii=False) + "\n")
        self._raw[VECTORS].write(np.ascontiguousarray(vectors, "<f4").tobytes())
        self._raw[PIXELS].write(np.ascontiguousarray(pixels, np.uint8).tobytes())
        self.rows += len(items)

    def finish(self, manifest: dict) -> None:
        """The .npy files, then the manifest (its presence marks a complete export)."""
        self._items.close()
        shapes = {VECTORS: ("<f4", (self.rows, manifest["dim"])),
                  PIXELS: ("|u1", (self.rows, *(manifest["pixel_shape"] or [])))}
        for name, (descr, shape) in shapes.items():
            self._raw[name].close()
            part = self.out / f"{name}.part"
            with open(self.out / name, "wb") as f, open(part, "rb") as raw:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": descr, "fortran_order": False, "shape": shape})
                shutil.copyfileobj(raw, f, 2**22)
                f.flush()
                os.fsync(f.fileno())
            part.unlink()
        atomic_write(self.out / MANIFEST, [json.dumps(manifest, indent=2).encode() + b"\n"])

    def abort(self) -> None:
        self._items.close()
        for f in self._raw.values():
            f.close()


@dataclass(frozen=True)
class Export:
    """An export folder, read: its manifest, its items (key, metadata) and its arrays mapped
    from disk (rows read only when a batch needs them)."""

    manifest: dict
    keys: list[str]
    metadata: list
    vectors: np.ndarray
    pixels: np.ndarray


def read_export(folder: str | Path) -> Export:
    """An export's files, checked against each other (ExportError naming what is wrong)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} holds no {MANIFEST}: not an export, or an incomplete one")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ExportError(f"{folder}: format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}, expected {FORMAT!r} {VERSION}")
    keys, metadata = [], []
    with open(folder / ITEMS, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            keys.append(item["key"])
            metadata.append(item.get("metadata"))
    vectors = np.load(folder / VECTORS, mmap_mode="r")
    pixels = np.load(folder / PIXELS, mmap_mode="r")
    n = manifest["count"]
    if not (len(keys) == len(vectors) == len(pixels) == n) or vectors.shape[1:] != (
            manifest["dim"],):
        raise ExportError(f"{folder}: {len(keys)} items, vectors {vectors.shape}, pixels "
                          f"{pixels.shape}; the manifest says {n} x dim {manifest['dim']}")
    return Export(manifest, keys, metadata, vectors, pixels)
