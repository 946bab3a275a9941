"""The served models: each model directory with its own ONNX Runtime session and batcher.

Bundled models are the directories of the settings (`served_model_dirs`, the first the default);
user models are registered with POST /models and live in `<data_dir>/models/<model_id>/`
(encoder.onnx + card.json, the same layout), so they are served again after a restart. Workers
find a model's directory by its id with `find_model_dir` (no session, no PyTorch).
"""

import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi.concurrency import run_in_threadpool

from byorl import model_dir
from byorl.service.batcher import Batcher, QueueFull
from byorl.service.errors import APIError
from byorl.service.images import decode_base64, decode_images
from byorl.service.settings import Settings
from byorl.service.store import NotFound, check_name

INLINE_DECODE_BYTES = 64 * 1024
USER_MODELS = "models"  # under the data directory


def user_models_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / USER_MODELS


def find_model_dir(settings: Settings, model_id: str) -> Path:
    """The directory of a served model, bundled or registered by a user (NotFound otherwise)."""
    user = user_models_root(settings) / check_name(model_id, "model")
    if (user / model_dir.CARD).is_file():
        return user
    for path in settings.served_model_dirs:
        if model_dir.read_card(path)["model_id"] == model_id:
            return path
    raise NotFound("model", model_id)


@dataclass
class ServedModel:
    """One model: its card, session and dynamic batcher (started in the event loop)."""

    card: dict
    model_dir: Path
    bundled: bool
    settings: Settings
    session: ort.InferenceSession = field(repr=False)
    batcher: Batcher = field(repr=False)

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
        requests that name no model get."""
        return {**self.card, "source": "bundled" if self.bundled else "user", "default": default}

    async def decode(self, blobs: list[bytes], limit: int) -> np.ndarray:
        """Image bytes -> uint8 (N, 3, S, S) at this model's input size; large payloads are
        decoded off the event loop, small ones (a thread hop costs more) on it."""
        args = (blobs, self.input_size, self.settings, limit)
        if sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES:
            return decode_images(*args)
        return await run_in_threadpool(decode_images, *args)

    async def decode_base64(self, images: list[str], limit: int) -> np.ndarray:
        return await self.decode([decode_base64(s, i) for i, s in enumerate(images)], limit)

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 pixels through the dynamic batcher; 429 when its queue is full."""
        try:
            return await self.batcher(pixels)
        except QueueFull as exc:
            raise APIError(429, "queue_full", f"{exc}: retry later",
                           {"Retry-After": str(exc.retry_after_s)}) from None


def load_model(model_dir: Path, settings: Settings, bundled: bool) -> ServedModel:
    """A model directory's session (sha256 checked) and batcher, after a warm-up call that
    checks the card's embedding size."""
    s = settings
    card = model_dir.read_card(model_dir)
    session = model_dir.load_onnx_session(model_dir, s.num_threads, s.device)
    logging.getLogger("uvicorn.error").info(
        "encoder %s on %s (BYORL_DEVICE=%s)", card["model_id"], model_dir.session_device(session),
        s.device)
    warmup = model_dir.embed(session, np.zeros((1, *card["input_size"]), np.uint8))
    if warmup.shape != (1, card["embedding_dim"]):
        raise RuntimeError(f"{model_dir}: the encoder returns {warmup.shape[1:]}, the card "
                           f"says {card['embedding_dim']}")
    batcher = Batcher(lambda x: model_dir.embed(session, x, s.max_batch), s.max_batch,
                      s.batch_wait_ms, s.max_queued_images)
    return ServedModel(card, Path(model_dir), bundled, settings, session, batcher)


class ModelRegistry:
    """Every served model by id, in order: the bundled ones (the first is the default), then
    the users' in the order they were registered."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[str, ServedModel] = {}
        for path in settings.served_model_dirs:
            self._put(load_model(path, settings, bundled=True))
        root = user_models_root(settings)
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*"):  # an interrupted registration or deletion
            shutil.rmtree(leftover, ignore_errors=True)
        user = [p for p in root.iterdir() if (p / model_dir.CARD).is_file()]
        for path in sorted(user, key=lambda p: model_dir.read_card(p).get("created_at", 0)):
            self._put(load_model(path, settings, bundled=False))

    def _put(self, model: ServedModel) -> None:
        if model.model_id in self._models:
            raise RuntimeError(f"{model.model_dir}: model {model.model_id!r} is served twice")
        self._models[model.model_id] = model

    def __iter__(self):
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    @property
    def default(self) -> ServedModel:
        return next(iter(self._models.values()))

    def get(self, model_id: str | None = None) -> ServedModel:
        """The named model, or the default one; 404 model_not_found for an unknown id."""
        if model_id is None:
            return self.default
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFound("model", model_id) from None

    def user_count(self) -> int:
        return sum(not m.bundled for m in self._models.values())

    def add(self, model: ServedModel) -> None:
        """Serve a newly registered model (its batcher starts on the running event loop)."""
        self._put(model)
        model.batcher.start()

    async def remove(self, model_id: str) -> None:
        """Stop serving a user model and delete its directory (renamed away first, atomically:
        a restart never finds half of it)."""
        model = self._models.pop(model_id)
        await model.batcher.stop()
        trash = model.model_dir.with_name(f".deleted-{model_id}-{uuid.uuid4().hex[:8]}")
        model.model_dir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def start(self) -> None:
        for model in self._models.values():
            model.batcher.start()

    async def stop(self) -> None:
        for model in list(self._models.values()):
            await model.batcher.stop()
