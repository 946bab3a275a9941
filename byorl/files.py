"""Crash-safe file writes and file hashes: the one implementation that training (checkpoints,
data caches, reports), the index and the service all write with."""

import contextlib
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`with atomic_file(path) as f:` a file opened for writing that replaces `path` only when
    the block ends without error, so that a crash at any moment leaves the old file or the new.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    renamed over `path` (atomic on POSIX), and the directory is fsynced so the rename itself is
    durable. A killed writer may leave a `.NAME.tmp-*` file behind, never a torn `path`; the
    next write of `path` removes such leftovers of writers that no longer run. Any writer works
    (`torch.save(obj, f)`, `np.save(f, a)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write `chunks` to `path` through `atomic_file`: the old file or the new, never a torn one."""
    with atomic_file(path) as f:
        for chunk in chunks:
            f.write(chunk)


def fsync_dir(path: str | Path) -> None:
    """Make the renames and creations in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.NAME.tmp-PID-*` files whose writer process is gone (killed mid-write)."""
    prefix = f".{path.name}.tmp-"
    for tmp in path.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large models need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """A JSON document, replaced atomically (records, cards, reports)."""
    atomic_write(path, [json.dumps(obj, indent=1).encode()])


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Arrays in one .npz file, replaced atomically (job inputs, heads' weights)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, [buf.getbuffer()])


def read_npz(path: str | Path | BinaryIO) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
