"""The served models: an `Encoder` (service/encoder.py) per model directory, by id.

Bundled models are the directories of the settings (`served_model_dirs`, the first the default),
loaded by each process from its own disk. User models are registered with POST /models in the
database's model registry (`storage/model_store.py`: every replica and worker reads it) and
their files live in the shared data directory, `<data_dir>/models/<model_id>/` (encoder.onnx +
card.json, the same layout, written once). A process serves a user model registered elsewhere
as soon as a request names it (a lookup miss asks the registry and loads it: no new trial, the
file's sha256 checked against the registry's), and its listing follows the registry within
MODEL_REFRESH_S (`ModelRegistry.refresh`, run periodically by the lifespan): new models are
loaded, deleted ones dropped. Workers find a model's directory by its id with `find_model_dir`
(no session, no PyTorch).
"""

import asyncio
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from anyio.to_thread import run_sync

from byorl import model_dir
from byorl.files import sha256_file
from byorl.service.exceptions import NotFound
from byorl.service.serving.encoder import Encoder, load_encoder
from byorl.service.settings import Settings
from byorl.service.storage.database import open_database
from byorl.service.storage.model_store import ModelStore

USER_MODELS = "models"  # under the data directory
# A dot-folder under it (an upload being written, a deletion's trash) older than this is a
# crash's leftover: removed at start. Younger ones may be another replica's upload in progress.
LEFTOVER_AGE_S = 3600
log = logging.getLogger("uvicorn.error")


def user_models_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / USER_MODELS


def user_model_path(model_id: str) -> str:
    """Where a user model's files lie, relative to the data directory (the registry's `path`)."""
    return f"{USER_MODELS}/{model_id}"


def model_store(settings: Settings) -> ModelStore:
    return ModelStore(open_database(settings.database()))


def find_model_dir(settings: Settings, model_id: str, store: ModelStore | None = None) -> Path:
    """The directory of a served model: a user model available in the registry (its file's
    sha256 checked against the registry's), or a bundled one (NotFound otherwise)."""
    record = (store or model_store(settings)).get(model_id)
    if record is not None:
        path = Path(settings.data_dir) / record["path"]
        onnx = path / model_dir.ONNX
        if not onnx.is_file():
            raise NotFound("model", model_id)
        if sha256_file(onnx) != record["onnx_sha256"]:
            raise RuntimeError(f"{onnx} does not match the sha256 of model {model_id!r} in the "
                               "model registry")
        return path
    for path in settings.served_model_dirs:
        if model_dir.read_card(path)["model_id"] == model_id:
            return path
    raise NotFound("model", model_id)


def remove_leftovers(root: Path, age_s: float = LEFTOVER_AGE_S) -> None:
    """Dot-folders that an interrupted upload or deletion left (older than `age_s`)."""
    for leftover in root.glob(".*"):
        try:
            if time.time() - leftover.stat().st_mtime > age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


class ModelRegistry:
    """Every served model by id: the bundled ones (the first is the default), then the users'
    in the order they were registered. A user model that fails to load is skipped (an error
    logged) and listed as unavailable: one bad upload never stops start-up."""

    def __init__(self, settings: Settings, store: ModelStore | None = None):
        self.settings = settings
        self.store = store or model_store(settings)
        self._models: dict[str, Encoder] = {}
        self._loaded_at: dict[str, float] = {}  # monotonic time each user model was put
        self._lock = threading.Lock()  # a lookup miss, the refresh and an upload may race
        self.unavailable: dict[str, dict] = {}  # user models that failed to load, by id
        self._unregistered: set[str] = set()  # folders on disk the registry cannot take
        for path in settings.served_model_dirs:
            self._put(load_encoder(path, settings, bundled=True))
        root = user_models_root(settings)
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        self._adopt(root)
        for record in self.store.available():
            self._load(record)

    def _adopt(self, root: Path) -> None:
        """Register the model folders stored before the registry existed (no row yet)."""
        known = self.store.known()
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or path.name in known:
                continue
            try:
                card = model_dir.read_card(path)
                if card["model_id"] != path.name:
                    raise ValueError(f"its card names model {card['model_id']!r}")
            except Exception as exc:  # a bad card: listed, deletable, never registered
                self._unavailable(path.name, exc)
                self._unregistered.add(path.name)
                continue
            if self.store.adopt(card, user_model_path(path.name)):
                log.info("user model %s registered from %s", path.name, path)

    def _unavailable(self, model_id: str, exc: Exception) -> None:
        log.error("user model %s is unavailable: %s", model_id, exc)
        self.unavailable[model_id] = {"model_id": model_id, "source": "user", "default": False,
                                      "available": False, "error": str(exc)[:300]}

    def _load(self, record: dict) -> Encoder | None:
        """A registered model's encoder, served from now on, or None with the reason recorded
        and logged (no trial: it passed one at upload; the sha256 of its file is checked)."""
        model_id = record["model_id"]
        try:
            model = load_encoder(Path(self.settings.data_dir) / record["path"], self.settings,
                                 bundled=False)
            if (model.model_id, model.card["onnx_sha256"]) != (model_id, record["onnx_sha256"]):
                raise RuntimeError(f"its card ({model.model_id}, sha256 "
                                   f"{model.card['onnx_sha256'][:12]}...) is not the registry's")
        except Exception as exc:  # a bad card, file or graph: this model only
            self._unavailable(model_id, exc)
            return None
        return self._put_user(model)

    def _put(self, model: Encoder) -> None:
        if model.model_id in self._models:
            raise RuntimeError(f"{model.model_dir}: model {model.model_id!r} is served twice")
        self._models[model.model_id] = model

    def _put_user(self, model: Encoder) -> Encoder:
        """Serve a user model; one loaded meanwhile by another path wins (this one dropped)."""
        with self._lock:
            if (served := self._models.get(model.model_id)) is not None:
                return served
            self.unavailable.pop(model.model_id, None)
            self._models[model.model_id] = model
            self._loaded_at[model.model_id] = time.monotonic()
            return model

    def __iter__(self):
        models = list(self._models.values())
        users = sorted((m for m in models if not m.bundled),
                       key=lambda m: (m.card.get("created_at", 0), m.model_id))
        return iter([m for m in models if m.bundled] + users)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: str) -> bool:
        try:
            self.get(model_id)
            return True
        except NotFound:
            return False

    @property
    def default(self) -> Encoder:
        return next(iter(self._models.values()))

    def bundled_ids(self) -> set[str]:
        return {m.model_id for m in self._models.values() if m.bundled}

    def get(self, model_id: str | None = None) -> Encoder:
        """The named model, or the default one; 404 model_not_found for an unknown id. A user
        model this process does not serve yet (registered through another replica) is looked
        up in the registry and loaded here, once (the caller waits for the load)."""
        if model_id is None:
            return self.default
        if (model := self._models.get(model_id)) is not None:
            return model
        if model_id in self.unavailable or (record := self.store.get(model_id)) is None:
            raise NotFound("model", model_id)
        if (model := self._load(record)) is None:
            raise NotFound("model", model_id)
        return model

    def user_count(self) -> int:
        """User models registered (in the registry: on every replica), and folders here that
        could not be registered."""
        return self.store.count() + len(self._unregistered)

    def add(self, model: Encoder) -> Encoder:
        """Serve a newly registered model (its batcher starts with its first request)."""
        return self._put_user(model)

    async def refresh(self) -> None:
        """Follow the registry: serve the models registered elsewhere, drop the ones deleted
        elsewhere (and models that failed here and were deleted since); a model id deleted and
        registered again with another file is served from the new one."""
        started = time.monotonic()
        records = await run_sync(self.store.available)
        live = {r["model_id"]: r for r in records}
        for model_id in list(self.unavailable):
            if model_id not in live and model_id not in self._unregistered:
                self.unavailable.pop(model_id, None)
        for model in list(self._models.values()):
            record = live.get(model.model_id)
            if model.bundled or self._loaded_at.get(model.model_id, 0) >= started:
                continue
            if record is None or record["onnx_sha256"] != model.card["onnx_sha256"]:
                await self._drop(model.model_id)  # deleted (and maybe registered again since)
        for model_id, record in live.items():
            if model_id not in self._models and model_id not in self.unavailable:
                if await run_sync(self._load, record) is not None:
                    log.info("user model %s registered elsewhere: now served", model_id)

    async def _drop(self, model_id: str) -> None:
        with self._lock:
            model = self._models.pop(model_id, None)
            self._loaded_at.pop(model_id, None)
        if model is not None:
            await model.batcher.stop()

    async def remove(self, model_id: str) -> None:
        """Delete a user model (or forget an unavailable one): marked deleted in the registry
        with its folder renamed away in the same transaction (a restart or another replica
        never finds half of it), then no longer served here."""
        trash: list[Path] = []

        def take_away(path: str) -> None:
            folder = Path(self.settings.data_dir) / path
            away = folder.with_name(f".deleted-{model_id}-{uuid.uuid4().hex[:8]}")
            if folder.exists():
                folder.rename(away)
                trash.append(away)

        if model_id in self._unregistered:
            take_away(user_model_path(model_id))
            self._unregistered.discard(model_id)
        else:
            try:
                await run_sync(self.store.delete, model_id, take_away)
            except NotFound:  # deleted through another replica meanwhile: gone here too
                self.unavailable.pop(model_id, None)
                await self._drop(model_id)
                raise
        self.unavailable.pop(model_id, None)
        await self._drop(model_id)
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)

    def start(self) -> None:
        for model in self._models.values():
            model.batcher.start()

    async def stop(self) -> None:
        for model in list(self._models.values()):
            await model.batcher.stop()


async def refresh_forever(registry: ModelRegistry, interval_s: float) -> None:
    """The lifespan's task: `registry.refresh()` every MODEL_REFRESH_S (an error is logged,
    never fatal: the next round tries again)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await registry.refresh()
        except Exception:
            log.exception("refreshing the served models from the model registry failed")
