"""The served models: an `Encoder` (service/encoder.py) per model directory, by id.

Bundled models are the directories of the settings (`served_model_dirs`, the first the default);
user models are registered with POST /models and live in `<data_dir>/models/<model_id>/`
(encoder.onnx + card.json, the same layout), so they are served again after a restart. Workers
find a model's directory by its id with `find_model_dir` (no session, no PyTorch).
"""

import logging
import shutil
import uuid
from pathlib import Path

from byorl import model_dir
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name
from byorl.service.serving.encoder import Encoder, load_encoder
from byorl.service.settings import Settings

USER_MODELS = "models"  # under the data directory
log = logging.getLogger("uvicorn.error")


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


class ModelRegistry:
    """Every served model by id, in order: the bundled ones (the first is the default), then
    the users' in the order they were registered. A stored user model that fails to load is
    skipped (an error logged) and listed as unavailable: one bad upload never stops start-up."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[str, Encoder] = {}
        self.unavailable: dict[str, dict] = {}  # user models that failed to load, by id
        for path in settings.served_model_dirs:
            self._put(load_encoder(path, settings, bundled=True))
        root = user_models_root(settings)
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*"):  # an interrupted registration or deletion
            shutil.rmtree(leftover, ignore_errors=True)
        user = [self._load_user_model(p) for p in sorted(root.iterdir()) if p.is_dir()]
        for model in sorted(filter(None, user), key=lambda m: m.card.get("created_at", 0)):
            self._put(model)

    def _load_user_model(self, path: Path) -> Encoder | None:
        """A stored user model's encoder, or None with the reason recorded and logged."""
        try:
            return load_encoder(path, self.settings, bundled=False)
        except Exception as exc:  # a bad card, file or graph: this model only
            log.error("user model %s is unavailable: %s", path.name, exc)
            self.unavailable[path.name] = {"model_id": path.name, "source": "user",
                                           "default": False, "available": False,
                                           "error": str(exc)[:300]}
            return None

    def _put(self, model: Encoder) -> None:
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
    def default(self) -> Encoder:
        return next(iter(self._models.values()))

    def get(self, model_id: str | None = None) -> Encoder:
        """The named model, or the default one; 404 model_not_found for an unknown id."""
        if model_id is None:
            return self.default
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFound("model", model_id) from None

    def user_count(self) -> int:
        return sum(not m.bundled for m in self._models.values()) + len(self.unavailable)

    def add(self, model: Encoder) -> None:
        """Serve a newly registered model (its batcher starts on the running event loop)."""
        self._put(model)
        model.batcher.start()

    async def remove(self, model_id: str) -> None:
        """Stop serving a user model (or forget an unavailable one) and delete its directory
        (renamed away first, atomically: a restart never finds half of it)."""
        path = user_models_root(self.settings) / model_id
        if self.unavailable.pop(model_id, None) is None:
            model = self._models.pop(model_id)
            await model.batcher.stop()
            path = model.model_dir
        trash = path.with_name(f".deleted-{model_id}-{uuid.uuid4().hex[:8]}")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def start(self) -> None:
        for model in self._models.values():
            model.batcher.start()

    async def stop(self) -> None:
        for model in list(self._models.values()):
            await model.batcher.stop()
