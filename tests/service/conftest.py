"""Fixtures of the service tests: the app on a tiny model, labeled images, hostile images."""

import base64
import os
import signal
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.service.settings import Settings
from tests.live import free_port, kill_group, start_process, uvicorn_argv, wait_ready


def grey_png(width: int, height: int, rows) -> bytes:
    """A greyscale PNG written by hand, its rows streamed through zlib (no big array)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(r) for r in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """A decompression bomb: 144 Mpixels of zeros, ~140 KB on the wire, 144 MB decoded."""
    side = 12_000
    row = b"\0" * (side + 1)  # filter byte + pixels
    data = grey_png(side, side, (row for _ in range(side)))
    assert len(data) < 1_000_000
    return data


@pytest.fixture(scope="session")
def labeled(image_bytes) -> tuple[list[str], list[int], list[str]]:
    """(base64 images, labels, class names) of the shared test images."""
    classes = sorted(image_bytes)
    images, labels = [], []
    for y, cls in enumerate(classes):
        images += [base64.b64encode(b).decode() for b in image_bytes[cls]]
        labels += [y] * len(image_bytes[cls])
    return images, labels, classes


SMALL_LIMITS = {"threads": 1, "max_images": 16, "max_bulk_images": 64, "max_body_bytes": 2**20}


@pytest.fixture(scope="session")
def settings(model_dir, tmp_path_factory) -> Settings:
    """Embedded jobs, small limits (so that the limit tests stay small), one thread."""
    return Settings(model_dir=model_dir, data_dir=tmp_path_factory.mktemp("data"), **SMALL_LIMITS)


@dataclass
class LiveApi:
    url: str
    log: Path


@pytest.fixture(scope="session")
def live_api(model_dir, tmp_path_factory):
    """The app under a real uvicorn in its own process: embedded jobs, the same small limits."""
    tmp = tmp_path_factory.mktemp("live")
    env = {**os.environ, "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp / "data"),
           "BYORL_REDIS_URL": "", "BYORL_API_KEY": "",
           **{f"BYORL_{k.upper()}": str(v) for k, v in SMALL_LIMITS.items()}}
    port = free_port()
    api = LiveApi(f"http://127.0.0.1:{port}", tmp / "api.log")
    proc = start_process(uvicorn_argv(port), env, api.log, tmp)
    try:
        wait_ready(api.url)
        yield api
    finally:
        kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def client(settings):
    """The app in-process (real ONNX Runtime, FAISS, files), lifespan run once per session."""
    with TestClient(create_app(settings)) as c:
        yield c
