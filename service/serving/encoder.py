"""One served encoder: what the routes call to turn request images into embeddings.

An `Encoder` decodes untrusted image bytes (base64 text or uploads) to model-input pixels
(`images.py`), queues them in its dynamic batcher (`batcher.py`) with the images of concurrent
requests, and runs its ONNX Runtime session on each batch (`byorl.model_dir.embed`): the whole
request path of an image, in one object.

On the CPU it holds two sessions of the same file. ONNX Runtime's threads busy-wait between
runs ("spinning"): that halves the latency of a lone small request, but under load the spinning
threads take the cores that the event loop needs to parse requests and send answers (measured
with `bench/bench_service.py`). So small batches (fewer than `SMALL_BATCH` images: few clients)
run on a spinning session, larger ones (many clients) on one that sleeps between runs. The
weights are held twice; on a GPU one session serves both.
"""

import asyncio
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from anyio import CapacityLimiter
from anyio.to_thread import run_sync

from byorl import model_dir
from byorl.service.exceptions import Busy, Invalid, NotFound
from byorl.service.serving.batcher import Batcher
from byorl.service.serving.images import decode_images
from byorl.service.settings import Settings

SMALL_BATCH = 4
_decoders: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter]" = (
    weakref.WeakKeyDictionary())


def decode_limiter(threads: int) -> CapacityLimiter:
    """The threads that decode request images in this process (its event loop), shared by all
    models: concurrent requests decode at most `threads` images at once (a 4096x4096 image
    takes ~200 MiB while it is decoded), not one per worker thread of the pool (40)."""
    loop = asyncio.get_running_loop()
    if loop not in _decoders:
        _decoders[loop] = CapacityLimiter(threads)
    return _decoders[loop]


@dataclass
class Encoder:
    """One model: its card, its sessions and its dynamic batcher (started in the event loop)."""

    card: dict
    model_dir: Path
    bundled: bool
    settings: Settings
    session: ort.InferenceSession = field(repr=False)  # large batches (no spinning on the CPU)
    latency_session: ort.InferenceSession = field(repr=False)  # batches of < SMALL_BATCH
    batcher: Batcher = field(init=False, repr=False)
    _probed: tuple[float, bool] = field(init=False, repr=False, default=(-math.inf, False))

    def __post_init__(self):
        s = self.settings
        self.batcher = Batcher(self.run, s.max_batch, s.batch_wait_ms, s.max_queued_images)

    @property
    def model_id(self) -> str:
        return self.card["model_id"]

    @property
    def input_size(self) -> int:
        return self.card["input_size"][-1]

    @property
    def dim(self) -> int:
        return self.card["embedding_dim"]

    def describe(self, default: bool) -> dict:
        """The card as GET /models shows it: where the model comes from, whether it is the one
        requests that name no model get; `available`: it loaded (see `ModelRegistry`)."""
        return {**self.card, "source": "bundled" if self.bundled else "user", "default": default,
                "available": True}

    async def pixels(self, images: list[str] | list[bytes], limit: int) -> np.ndarray:
        """Base64 strings or image bytes -> uint8 (N, 3, S, S) at this model's input size, at
        most `limit` images, decoded off the event loop whatever the body's size (a 944-byte
        WebP can decode to 4096x4096: a second of CPU)."""
        return await run_sync(decode_images, images, self.input_size, self.settings, limit,
                              limiter=decode_limiter(self.settings.decode_threads))

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 pixels through the dynamic batcher (`QueueFull` when its queue is
        at its bound); 422 `invalid_vector` when the model returns NaN or infinity for an image
        (a user's model can), which no route may answer or store; 404 `model_not_found` once
        the model is no longer served (deleted)."""
        if self.batcher.closed:
            raise NotFound("model", self.model_id)
        vectors = await self.batcher(pixels)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise Invalid("invalid_vector", f"model {self.model_id!r} returned NaN or infinity "
                          f"for images[{int(np.argmin(finite))}]")
        return vectors

    async def probe(self) -> bool:
        """Whether the model embeds right now: one grey image through its whole path (batcher,
        ONNX Runtime, the finite check), at most once per READY_PROBE_S (readiness calls this
        every few seconds; a full queue means busy, not broken)."""
        checked, ok = self._probed
        if time.monotonic() - checked < self.settings.ready_probe_s:
            return ok
        grey = np.full((1, 3, self.input_size, self.input_size), 128, np.uint8)
        try:
            ok = (await self.embed(grey)).shape == (1, self.dim)
        except Busy:
            ok = True
        except Exception:  # any failure of the model is what the probe reports
            logging.getLogger("uvicorn.error").exception("model %s failed its probe",
                                                         self.model_id)
            ok = False
        self._probed = (time.monotonic(), ok)
        return ok

    async def embed_images(self, images: list[str] | list[bytes], limit: int) -> np.ndarray:
        """Decode and embed: what a request that keeps no pixels needs."""
        return await self.embed(await self.pixels(images, limit))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """One batch through ONNX Runtime (the batcher's thread calls it)."""
        session = self.latency_session if len(pixels) < SMALL_BATCH else self.session
        return model_dir.embed(session, pixels, self.settings.max_batch)


def load_encoder(path: Path, settings: Settings, bundled: bool) -> Encoder:
    """A model directory's sessions (sha256 checked) and batcher, after a warm-up call that
    checks the card's embedding size."""
    card = model_dir.read_card(path)
    untrusted = not bundled  # a user's graph: no external data, no memory arena
    session = model_dir.load_onnx_session(path, settings.num_threads, settings.device,
                                          spin=False, untrusted=untrusted)
    latency = session
    if model_dir.session_device(session) == "cpu":
        latency = model_dir.load_onnx_session(path, settings.num_threads, "cpu", spin=True,
                                              untrusted=untrusted)
    logging.getLogger("uvicorn.error").info(
        "encoder %s on %s (BYORL_DEVICE=%s)", card["model_id"], model_dir.session_device(session),
        settings.device)
    encoder = Encoder(card, Path(path), bundled, settings, session, latency)
    for n in (1, SMALL_BATCH):  # both sessions
        warmup = encoder.run(np.zeros((n, *card["input_size"]), np.uint8))
        if warmup.shape != (n, card["embedding_dim"]):
            raise RuntimeError(f"{path}: the encoder returns {warmup.shape[1:]}, the card "
                               f"says {card['embedding_dim']}")
    return encoder
