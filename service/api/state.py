"""What the lifespan handler loads once and every request shares: settings, the served encoders,
the galleries, the stores and the job queue, and the lookups that tie stored things (an index,
a head) to the encoder that made them."""

from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from byorl.service.exceptions import Conflict, Unavailable
from byorl.service.jobs.queue import CeleryQueue, EmbeddedQueue, make_queue
from byorl.service.serving.encoder import Encoder
from byorl.service.serving.served_models import ModelRegistry
from byorl.service.settings import Settings
from byorl.service.storage.database import open_database
from byorl.service.storage.gallery_backends import GalleryBackend, open_galleries
from byorl.service.storage.head_store import HeadStore
from byorl.service.storage.job_store import JobStore
from byorl.service.storage.model_store import ModelStore
from byorl.service.storage.report_store import ReportStore


@dataclass
class AppState:
    settings: Settings
    models: ModelRegistry
    galleries: GalleryBackend
    jobs: JobStore
    heads: HeadStore
    reports: ReportStore
    queue: CeleryQueue | EmbeddedQueue

    def model(self, name: str | None) -> Encoder:
        """The model a request names (`model`), or the default one."""
        return self.models.get(name)

    def model_of(self, model_id: str, asked: str | None, what: str) -> Encoder:
        """The model that a stored thing (an index, a head) is tied to: 409 when the request
        names another model, or when the service no longer serves it."""
        if asked is not None and asked != model_id:
            raise Conflict(f"{what} belongs to model {model_id!r}, not {asked!r}",
                           "model_mismatch")
        if model_id not in self.models:
            raise Conflict(f"{what} belongs to model {model_id!r}, which this service does not "
                           "serve", "model_mismatch")
        return self.models.get(model_id)

    def index_model(self, name: str, asked: str | None = None) -> Encoder:
        """An index holds vectors of one model: images added to it or searched in it are
        embedded by that model (404 for an unknown index, 409 as `model_of`)."""
        return self.model_of(self.galleries.get(name).model_id, asked, f"index {name!r}")

    def restore_model(self, name: str, model_id: str, onnx_sha256: str) -> Encoder:
        """The model of an index that vectors made elsewhere are added to: the index's own
        (409 `model_mismatch` as `index_model`), served from the very file that made them (409
        `model_hash_mismatch` when the card hashes differ: same id, other weights)."""
        model = self.index_model(name, model_id)
        if model.card["onnx_sha256"] != onnx_sha256:
            raise Conflict(f"the vectors were made by model {model_id!r} with card hash "
                           f"{onnx_sha256[:12]}..., but this service serves it with "
                           f"{model.card['onnx_sha256'][:12]}...: other weights",
                           "model_hash_mismatch")
        return model

    def card_hash(self, model_id: str) -> str | None:
        """The card hash (onnx_sha256) of a served model; None when it is not served."""
        return self.models.get(model_id).card["onnx_sha256"] if model_id in self.models else None

    def head_model(self, head_id: str, asked: str | None = None) -> tuple[dict, Encoder]:
        """A head's card and the model it was fitted on (409 as `model_of`)."""
        card = self.heads.card(head_id)
        return card, self.model_of(card["model_id"], asked, f"head {head_id!r}")

    async def submit_job(self, kind: str, model: Encoder, params: dict, **arrays) -> dict:
        """Record a job (for `model`) and its inputs in the data directory, then queue its id
        (503 when the queue is unreachable: the job is marked failed)."""
        job = await run_in_threadpool(self.jobs.create, kind,
                                      {**params, "model_id": model.model_id}, **arrays)
        try:
            await run_in_threadpool(self.queue.submit, job["id"])
        except Exception as exc:
            self.jobs.update(job["id"], state="failed", stage="failed",
                             error="could not be queued")
            raise Unavailable("broker_unavailable",
                              f"the job queue is unreachable: {exc}") from None
        return job


def load_state(settings: Settings) -> AppState:
    db = open_database(settings.database())
    return AppState(settings, ModelRegistry(settings, ModelStore(db)), open_galleries(settings),
                    JobStore.from_settings(settings), HeadStore(db), ReportStore(db),
                    make_queue(settings))
