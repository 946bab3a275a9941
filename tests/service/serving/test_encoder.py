"""The encoder object: decode (base64 or bytes), batch, embed; which session runs a batch."""

import asyncio
import base64
from dataclasses import replace

import numpy as np
import pytest

from byorl import model_dir as md
from byorl.service.exceptions import TooLarge
from byorl.service.serving.encoder import SMALL_BATCH, load_encoder
from byorl.service.serving.images import decode_images
from byorl.service.settings import Settings


@pytest.fixture(scope="module")
def encoder(model_dir, tmp_path_factory):
    settings = Settings(model_dirs=[model_dir], data_dir=tmp_path_factory.mktemp("d"), threads=1)
    return load_encoder(model_dir, settings, bundled=True)


def spins(session) -> bool:
    """ONNX Runtime's threads busy-wait unless the session sets allow_spinning to 0."""
    try:
        return session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: the default, spinning
        return True


def test_cpu_batches_run_on_a_spinning_session_only_when_small(encoder):
    assert encoder.latency_session is not encoder.session  # two sessions on the CPU
    assert spins(encoder.latency_session) and not spins(encoder.session)
    used = []

    class Recording:
        def __init__(self, session, name):
            self.session, self.name = session, name

        def __getattr__(self, attr):
            return getattr(self.session, attr)

        def run(self, *args):
            used.append(self.name)
            return self.session.run(*args)

    spied = replace(encoder, session=Recording(encoder.session, "large"),
                    latency_session=Recording(encoder.latency_session, "small"))
    pixels = np.zeros((SMALL_BATCH, *encoder.card["input_size"]), np.uint8)
    spied.run(pixels[: SMALL_BATCH - 1])
    spied.run(pixels)
    assert used == ["small", "large"]


def test_both_sessions_give_the_same_embeddings(encoder, image_bytes):
    blobs = [b for bs in image_bytes.values() for b in bs][:SMALL_BATCH]
    pixels = decode_images(blobs, encoder.input_size, encoder.settings, 64)
    reference = md.embed(md.load_onnx_session(encoder.model_dir, 1), pixels)
    one_by_one = np.concatenate([encoder.run(p[None]) for p in pixels])
    np.testing.assert_allclose(encoder.run(pixels), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one_by_one, reference, rtol=1e-5, atol=1e-5)


def test_base64_and_bytes_decode_and_embed_alike_through_the_batcher(encoder, image_bytes):
    blobs = [b for bs in image_bytes.values() for b in bs][:3]
    text = [base64.b64encode(b).decode() for b in blobs]

    async def go():
        encoder.batcher.start()
        try:
            from_text = await encoder.pixels(text, 8)
            vectors = await encoder.embed_images(blobs, 8)
        finally:
            await encoder.batcher.stop()
        return from_text, vectors

    from_text, vectors = asyncio.run(go())
    expected = decode_images(blobs, encoder.input_size, encoder.settings, 8)
    np.testing.assert_array_equal(from_text, expected)
    np.testing.assert_allclose(vectors, encoder.run(expected), rtol=1e-5, atol=1e-5)


def test_the_image_limit_is_counted_before_anything_is_decoded(encoder):
    not_even_base64 = ["!!"] * 3
    with pytest.raises(TooLarge) as exc:
        asyncio.run(encoder.pixels(not_even_base64, 2))
    assert exc.value.code == "too_many_images"


@pytest.mark.parametrize("threads", [1, 3])
def test_concurrent_requests_decode_at_most_decode_threads_images_at_once(
        encoder, image_bytes, monkeypatch, threads):
    """Eight requests at once, each decoding in a worker thread: never more than
    DECODE_THREADS of them decode together (the memory bound), and all are served."""
    import threading
    import time

    from byorl.service.serving import encoder as module

    blob = next(iter(image_bytes.values()))[0]
    lock, now, peak = threading.Lock(), [0], [0]

    def counting_decode(*args):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)  # long enough for every request to have asked for a thread
        try:
            return decode_images(*args)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(module, "decode_images", counting_decode)
    limited = replace(encoder, settings=encoder.settings.model_copy(
        update={"decode_threads": threads}))

    async def go():
        return await asyncio.gather(*(limited.pixels([blob], 1) for _ in range(8)))

    results = asyncio.run(go())
    assert peak[0] == threads
    assert all(r.shape == (1, 3, encoder.input_size, encoder.input_size) for r in results)
