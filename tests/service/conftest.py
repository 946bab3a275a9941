"""Fixtures of the service tests: the app on a tiny model, labeled images, hostile images."""

import base64
import os
import signal
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.service.settings import Settings
from tests.conftest import fresh_database, milvus_settings
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


def start_live_api(model_dir, tmp: Path, **settings: str):
    """The app under a real uvicorn in its own process (embedded jobs, the same small limits,
    `settings` as more BYORL_ variables), until the generator is closed."""
    env = {**os.environ, "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp / "data"),
           "BYORL_REDIS_URL": "", "BYORL_API_KEY": "",
           **{f"BYORL_{k.upper()}": str(v) for k, v in {**SMALL_LIMITS, **settings}.items()}}
    port = free_port()
    api = LiveApi(f"http://127.0.0.1:{port}", tmp / "api.log")
    proc = start_process(uvicorn_argv(port), env, api.log, tmp)
    try:
        wait_ready(api.url)
        yield api
    finally:
        kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def live_api(model_dir, tmp_path_factory):
    """The app under a real uvicorn in its own process: embedded jobs, the same small limits."""
    yield from start_live_api(model_dir, tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="session")
def live_api_scaled(model_dir, postgres, milvus, tmp_path_factory):
    """The same, configured as a scaled-out replica: its database on the tests' PostgreSQL
    (`BYORL_DATABASE_URL`), its galleries on the session's Milvus (`BYORL_MILVUS_URI`, a
    collection prefix of its own)."""
    yield from start_live_api(model_dir, tmp_path_factory.mktemp("live-scaled"),
                              database_url=fresh_database(postgres), milvus_uri=milvus,
                              milvus_prefix=f"s{uuid.uuid4().hex[:10]}_")


@pytest.fixture(scope="session")
def client(settings):
    """The app in-process (real ONNX Runtime, FAISS, files), lifespan run once per session."""
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module", params=["embedded", "milvus"])
def gallery_settings(request, settings, tmp_path_factory) -> Settings:
    """The settings of `gallery_client` on each gallery back-end: `settings` (embedded FAISS +
    SQLite), or the same limits with the galleries on the session's Milvus server (catalog and
    keys in SQLite, searches at Strong consistency: read-your-writes within a test)."""
    if request.param == "embedded":
        return settings
    return milvus_settings(request.getfixturevalue("milvus"),
                           tmp_path_factory.mktemp("milvus-api"), model_dir=settings.model_dir,
                           milvus_consistency="strong", **SMALL_LIMITS)


@pytest.fixture(scope="module")
def gallery_client(request, gallery_settings):
    """The app in-process on `gallery_settings`: the gallery route tests that take it run on
    both back-ends (embedded: the session's `client`)."""
    if not gallery_settings.milvus_uri:
        yield request.getfixturevalue("client")
        return
    with TestClient(create_app(gallery_settings)) as c:
        yield c

