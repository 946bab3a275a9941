"""Every knob of the service in one place, read from the environment (prefix BYORL_)."""

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODELS = (Path("models/default"), Path("models/byol-reference"))
DATABASE_FILE = "byorl.db"  # the embedded database of jobs, heads and reports (data directory)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BYORL_", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")  # indexes, heads, jobs and reports; shared by api and workers
    model_dir: Path = Path("models/default")  # encoder.onnx + card.json (+ encoder.pt for workers)
    # Every served model directory, the first the default (comma list); empty: MODEL_DIR alone
    # when it is set, else both bundled models (`served_model_dirs`).
    model_dirs: Annotated[list[Path], NoDecode] = []
    redis_url: str = ""  # empty: jobs run in-process (embedded mode); else Celery on this Redis
    # Jobs, heads and reports: empty = SQLite in the data directory (one machine); a
    # postgresql:// URL = PostgreSQL, shared by every api replica and worker.
    database_url: SecretStr = SecretStr("")
    # Galleries: empty = FAISS + SQLite in the data directory (one process); an http:// URI =
    # collections on that Milvus server, their catalog and keys in the database above, so that
    # every api replica and worker sees the same galleries.
    milvus_uri: str = ""
    milvus_token: SecretStr = SecretStr("")  # "user:password" or an API key, when it asks one
    milvus_prefix: str = Field("byorl_", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # collections
    # A /search's default consistency on Milvus: "bounded" may miss writes of the last
    # gracefulTime (5 s by default) and answers in milliseconds; "strong" sees every
    # acknowledged write, at the cost of waiting for the server's timestamps (0.2-0.5 s).
    milvus_consistency: Literal["bounded", "strong"] = "bounded"
    api_key: SecretStr | None = None  # when set, every route but probes and metrics needs it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # ONNX Runtime and jobs: auto = GPU if any

    # Request limits: each one a clear 4xx, checked before any heavy work.
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    max_images: int = Field(256, ge=1)  # per /embed, /search or /predict request
    max_bulk_images: int = Field(10_000, ge=2)  # per gallery add, /linear-head or /audits
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # width * height before decoding
    # All images of one request, from their headers before any is decoded: a 57 KB body of
    # 60 tiny lossless WebPs decodes to 1 Gpixel (a minute of CPU).
    max_request_pixels: int = Field(64 * 2**20, ge=1)
    # Requests decoding images at once, per process (each image ~200 MiB at 4096x4096 while it
    # is decoded): memory stays bounded however many requests arrive together.
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    max_image_side: int = Field(8192, ge=1)
    min_image_side: int = Field(8, ge=1)
    max_metadata_bytes: int = Field(16 * 2**10, ge=4)  # one item's metadata, as JSON text
    # What one answer may hold: hits of one /search (queries x k), and the bytes of a /search
    # answer or a page of items (the metadata that a gallery returns is stored text).
    max_search_results: int = Field(10_000, ge=1)
    max_response_bytes: int = Field(16 * 2**20, ge=1024)
    # A /search metadata filter: its fields (conditions), and its values (equalities and "in"
    # values together); more: 422 filter_too_large.
    max_filter_fields: int = Field(16, ge=1)
    max_filter_values: int = Field(1024, ge=1)
    max_classes: int = Field(1000, ge=2)  # of a head: its /predict answers images x classes
    # What a user's encoder (POST /models) may cost: its ONNX file, its square input side, the
    # length of its vectors, and how many such models the service keeps loaded.
    max_model_bytes: int = Field(64 * 2**20, ge=1024)
    max_model_input_size: int = Field(224, ge=8)
    max_model_dim: int = Field(4096, ge=1)
    max_user_models: int = Field(8, ge=0)
    # A user model's upload trial runs in a child process under these limits (address space
    # beyond the runtime's own, wall clock); a served user model's session has no memory arena.
    model_trial_memory_bytes: int = Field(512 * 2**20, ge=2**20)
    model_trial_timeout_s: float = Field(60, gt=0)
    # How often each api process reads the model registry (the database) to serve the user
    # models registered, and drop the ones deleted, through other replicas: the bound on how
    # long a listing (and a deleted model) lags; a request naming a model not yet served here
    # finds it in the registry at once.
    model_refresh_s: float = Field(5.0, gt=0)
    # What a gallery's FAISS factory string may ask for (each allocated at creation and start).
    max_factory_lists: int = Field(65_536, ge=1)  # IVF lists: lists x dim floats of centroids
    max_factory_pq_bits: int = Field(12, ge=1)  # bits per PQ code: 2**bits x dim floats
    max_factory_graph_degree: int = Field(128, ge=2)  # HNSW neighbours per node

    # Dynamic batching of /embed-like requests into one ONNX Runtime call.
    batch_wait_ms: float = Field(0.0, ge=0)  # 0: the images that come while the model runs batch
    max_batch: int = Field(64, ge=1)
    max_queued_images: int = Field(1024, ge=1)  # waiting for the batcher; past it: 429
    threads: int = Field(0, ge=0)  # ONNX Runtime and torch threads; 0 = all cores
    ready_probe_s: float = Field(5.0, ge=0)  # /readyz embeds one image per model this often

    # Jobs.
    job_time_limit_s: int = Field(6 * 3600, ge=1)  # the longest job a worker may run
    # A job's runner renews its lease every heartbeat; the api sweeps every sweep interval for
    # jobs whose lease lapsed (runner silent for lease seconds, or its process gone) and queues
    # them again, at most max_attempts starts in all: a job whose whole worker was killed runs
    # again within lease + sweep seconds (75 s by default) on a live worker.
    job_heartbeat_s: float = Field(10, gt=0)
    job_lease_s: float = Field(60, gt=0)
    job_sweep_s: float = Field(15, gt=0)
    job_max_attempts: int = Field(3, ge=1)
    worker_max_tasks_per_child: int = Field(20, ge=1)  # recycle workers to bound memory
    # How long a new Celery pool child may take to report ready before Celery kills it
    # (Celery's default, 4 s, is less than importing PyTorch under load: 15-20 s).
    worker_proc_alive_timeout_s: float = Field(120, gt=0)
    embedded_workers: int = Field(1, ge=1)  # job processes in embedded mode

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        return v or None  # BYORL_API_KEY= (empty, as compose passes it) means no key

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self):
        if self.job_lease_s < 3 * self.job_heartbeat_s:
            raise ValueError(f"job_lease_s ({self.job_lease_s}) must be at least 3 heartbeats "
                             f"({3 * self.job_heartbeat_s}): a slow beat must not lose the lease")
        return self

    @property
    def served_model_dirs(self) -> list[Path]:
        """The model directories to serve, the default one first."""
        if self.model_dirs:
            return list(self.model_dirs)
        return [self.model_dir] if "model_dir" in self.model_fields_set else list(BUNDLED_MODELS)

    def database(self) -> str:
        """The SQLAlchemy URL of the jobs', heads' and reports' database: PostgreSQL (psycopg 3)
        when DATABASE_URL is set, else the data directory's SQLite file."""
        url = self.database_url.get_secret_value()
        if not url:
            return f"sqlite:///{self.data_dir.resolve() / DATABASE_FILE}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def job_kill_after_s(self) -> int:
        """Hard limit: the process of a job still running this long (past the soft limit) is
        killed."""
        return self.job_time_limit_s + max(5, self.job_time_limit_s // 20)

    @property
    def visibility_timeout_s(self) -> int:
        """Redis re-delivers an unacknowledged job after this long: it outlasts any job, so that
        a live job's message is not delivered again (the job of a dead worker is queued again
        by the lease sweep long before; its old message, when it comes back, finds it done)."""
        return self.job_kill_after_s + max(5, self.job_time_limit_s // 10)
