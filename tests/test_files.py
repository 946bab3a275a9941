import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from byorl.files import atomic_file, atomic_write, sha256_file


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, [b"old"])
    atomic_write(path, [b"new ", memoryview(b"content")])
    assert path.read_bytes() == b"new content"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, [b"old"])

    def chunks():
        yield b"half of the new"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, chunks())
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_file_takes_any_writer_and_keeps_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "a.npy"
    with atomic_file(path) as f:
        np.save(f, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="bad array"), atomic_file(path) as f:
        np.save(f, np.arange(5))
        raise ValueError("bad array")
    assert np.load(path).tolist() == [0, 1, 2]  # the half-written replacement never landed
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_sha256_file_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "f.bin"
    stale = tmp_path / f".f.bin.tmp-{dead.pid}-0123abcd"
    live = tmp_path / f".f.bin.tmp-{os.getpid()}-4567ef01"  # a writer still running: kept
    other = tmp_path / f".g.bin.tmp-{dead.pid}-89abcdef"  # another file's temporary: kept
    for p in (stale, live, other):
        p.write_bytes(b"half")
    atomic_write(path, [b"new"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.bin", live.name, other.name])
