"""Request and response bodies (pydantic v2): the API's contract, rendered at /docs."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from byorl.index.faiss_index import InvalidFilterError, parse_filter
from byorl.service.api.pagination import Page
from byorl.service.jobs.head_rule import (
    AUTO_VALIDATION_FRACTION,
    MIN_LABELS_FOR_HOLDOUT,
    SMALL_SET_L2,
)
from byorl.service.names import NAME

Base64Image = Annotated[str, Field(description="A PNG, JPEG or WebP image, base64 (or data URL)")]
# Every list a body can hold stops validating at its first bad element (`fail_fast`): pydantic
# otherwise builds one error per element (25 MB of `[{}, {}, ...]`: 158 s, 10.6 GB).
FAIL_FAST = {"fail_fast": True}
Vector = Annotated[list[float], Field(fail_fast=True)]
# A key is any text but NUL (PostgreSQL's text refuses it; galleries on Milvus keep their keys
# there: one rule for every back-end).
Key = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]
ClassName = Annotated[str, Field(min_length=1, max_length=256)]
Name = Annotated[str, Field(pattern=NAME.pattern)]
ModelName = Annotated[str | None, Field(
    pattern=NAME.pattern, description="A served model's id (GET /models); default: the "
    "model of the index or head the request uses, else the service's first model")]
AuditMethod = Annotated[Literal["auto", "white-box", "black-box"], Field(
    description="white-box: gradients (the model's PyTorch weights, or its ONNX graph "
    "converted to PyTorch after a parity check); black-box: Square, queries through ONNX "
    "Runtime only (an upper bound on robustness); auto: white-box when possible")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a default


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable and machine-readable, e.g. index_not_found")
    message: str = Field(description="What was wrong, naming the field or limit")


class ErrorBody(BaseModel):
    """Every error answer: {"error": {"code": ..., "message": ...}}."""

    error: ErrorDetail


class ThreatModel(Strict):
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0, le=64, description="Budget in [0, 1] pixel units")


class Images(Strict):
    images: list[Base64Image] = Field(min_length=1, **FAIL_FAST)
    model: ModelName = None


class EmbedRequest(Images):
    normalize: bool = Field(True, description="Unit-length vectors (what cosine search expects)")


class Embeddings(BaseModel):
    model_id: str
    dim: int
    normalized: bool = Field(description="Whether each vector has unit L2 norm")
    embeddings: list[list[float]]


class OpenAIEmbeddingsRequest(Strict):
    """POST /v1/embeddings, as the OpenAI embeddings API (and Infinity for images) takes it."""

    model: Name = Field(description="A served model's id (GET /v1/models)")
    input: Base64Image | list[Base64Image] = Field(
        description="One image or a list: base64 data URLs (data:image/png;base64,...) or raw "
        "base64")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64")
    dimensions: int | None = Field(None, ge=1, description="Only the model's own dimension "
                                   "(no truncation): anything else is a 422")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored")

    @model_validator(mode="after")
    def _bounded_list(self):
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: at least one image")
        return self


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="Images embedded (an image counts as one token)")
    total_tokens: int


class OpenAIEmbeddings(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModels(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class GalleryCreate(Strict):
    name: Name
    model: ModelName = None
    factory: str | None = Field(
        None, description="The index type: a FAISS factory string, e.g. Flat, HNSW32, "
        "IVF256,Flat (on Milvus: Flat, HNSW<degree> or IVF<lists>,Flat). Default: Flat (exact), "
        "or HNSW16 on Milvus")


class GalleryInfo(BaseModel):
    name: str
    model_id: str
    dim: int
    factory: str
    count: int


class ItemsAdd(Strict):
    keys: list[Key] = Field(min_length=1, **FAIL_FAST)
    images: list[Base64Image] = Field(min_length=1, **FAIL_FAST)
    metadata: list[Any] | None = Field(None, description="One JSON value per key")
    model: ModelName = None

    @model_validator(mode="after")
    def _same_length(self):
        n = len(self.keys)
        if len(self.images) != n or (self.metadata is not None and len(self.metadata) != n):
            raise ValueError("keys, images and metadata must have the same length")
        return self


class ItemsAdded(BaseModel):
    index: str
    added: int
    count: int


class Item(BaseModel):
    key: str
    metadata: Any = None


class ItemsPage(Page[Item]):
    index: str


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class VectorsAdd(Strict):
    """Items as an export holds them, stored without embedding (a restore)."""

    keys: list[Key] = Field(min_length=1, **FAIL_FAST)
    vectors: str = Field(description="base64 of little-endian float32 rows (keys x dim)")
    pixels: str = Field(description="base64 of uint8 rows (keys x 3 x S x S, the model's input)")
    metadata: list[Any] | None = Field(None, description="One JSON value per key")
    model_id: Name = Field(description="The model that made the vectors: the gallery's")
    onnx_sha256: Sha256 = Field(description="That model's card hash (onnx_sha256): the "
                                "served model must be the same file")

    @model_validator(mode="after")
    def _same_length(self):
        if self.metadata is not None and len(self.metadata) != len(self.keys):
            raise ValueError("keys and metadata must have the same length")
        return self


class ExportItem(BaseModel):
    key: str
    metadata: Any = None


class ExportPage(Page[ExportItem]):
    """A page of a gallery's items with their vectors and pixels: row i of `vectors` and
    `pixels` is items[i]. Fewer items than `limit` when more would pass MAX_RESPONSE_BYTES
    (next_offset says where to go on)."""

    index: str
    model_id: str
    onnx_sha256: str | None = Field(description="The card hash of the gallery's model; null when "
                                    "the service no longer serves it")
    dim: int
    factory: str
    pixel_shape: list[int] | None = Field(description="(3, S, S); null for a gallery never "
                                          "added to")
    vectors: str = Field(description="base64 of little-endian float32 rows (items x dim)")
    pixels: str = Field(description="base64 of uint8 rows (items x pixel_shape)")


class Removed(BaseModel):
    index: str
    removed: int
    count: int


class SearchRequest(Strict):
    index: Name
    images: list[Base64Image] | None = Field(None, min_length=1, **FAIL_FAST)
    embeddings: list[Vector] | None = Field(None, min_length=1, **FAIL_FAST)
    k: int = Field(10, ge=1, le=1000)
    model: ModelName = None
    filter: dict[str, Any] | None = Field(
        None, description="Only items whose metadata matches every condition: {field: value} "
        "(equality with a JSON scalar: 1 matches 1 and 1.0, never \"1\" or true) or {field: "
        "{\"in\": [values]}}, on top-level fields of object metadata. The k hits are the k "
        "most similar matching items (fewer when fewer match)",
        examples=[{"source": "web", "label": {"in": [1, 2]}}])
    ef: int | None = Field(None, ge=1, le=4096, description="HNSW indexes: the candidate list "
                           "of a search (more: better recall, slower); default 64, at least k")
    nprobe: int | None = Field(None, ge=1, le=65_536, description="IVF indexes: the lists a "
                               "search visits (more: better recall, slower); default 16")
    consistency: Literal["bounded", "strong"] | None = Field(
        None, description="Galleries on Milvus: strong sees every acknowledged write (read your "
        "writes, ~0.2-0.5 s), bounded may miss the last seconds' writes (milliseconds). Default: "
        "the MILVUS_CONSISTENCY setting. Embedded galleries always see every answered write")

    @field_validator("filter")
    @classmethod
    def _filter_shape(cls, v):
        try:
            parse_filter(v)
        except InvalidFilterError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _one_query_kind(self):
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        return self


class Hit(BaseModel):
    key: str
    score: float = Field(description="Cosine similarity")
    metadata: Any = None


class SearchResults(BaseModel):
    index: str
    model_id: str
    results: list[list[Hit]]


class LabeledSet(Strict):
    """Images with labels, or keys of items already in an index with labels."""

    classes: list[ClassName] = Field(min_length=2, **FAIL_FAST,
                                     description="Class names; label i is classes[i]")
    labels: list[int] = Field(min_length=2, **FAIL_FAST)
    images: list[Base64Image] | None = Field(None, min_length=1, **FAIL_FAST)
    index: Name | None = None
    keys: list[Key] | None = Field(None, min_length=1, **FAIL_FAST)
    model: ModelName = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.images is None) == (self.keys is None) or (self.keys is None) != (
            self.index is None
        ):
            raise ValueError("give either images, or index and keys")
        if len(self.images if self.images is not None else self.keys) != len(self.labels):
            raise ValueError("one label per image (or key)")
        return self


class LinearHeadRequest(LabeledSet):
    robust: bool = Field(False, description="Train the head adversarially through the encoder")
    threat: ThreatModel = ThreatModel()
    epochs: int = Field(50, ge=1, le=1000)
    attack_steps: int = Field(10, ge=1, le=1000, description="PGD steps of robust training")
    min_steps: int = Field(2000, ge=0, le=1_000_000, description="Least optimiser steps in all")
    validation_fraction: float | None = Field(
        None, ge=0, lt=1, description="Held out for early stopping and choosing the L2 strength "
        f"(0: keep the last epoch; null: {AUTO_VALIDATION_FRACTION:.0%} from "
        f"{MIN_LABELS_FOR_HOLDOUT} labeled images on, else none)"
    )
    l2: float | None = Field(
        None, ge=0, le=10, description="L2 strength of a non-robust head on standardised "
        f"features (null: chosen on the held-out images, or {SMALL_SET_L2:g} without them)"
    )


class RobustnessAudit(Strict):
    kind: Literal["robustness"]
    head_id: Name
    labels: list[int] = Field(min_length=1, **FAIL_FAST)
    images: list[Base64Image] = Field(min_length=1, **FAIL_FAST)
    threat: ThreatModel = ThreatModel()
    mode: Literal["quick", "full"] = Field(
        "quick", description="quick (the default): a smoke run of the suite (AutoPGD-CE/-DLR "
        "1x20, MultiTargeted 3x20, Square 300 queries), minutes; its report says upper_bound. "
        "full: the paper's suite (5x100, 5x100, 20x200, 5000 queries) with its sanity checks, "
        "hours on a CPU")
    method: AuditMethod = "auto"
    model: ModelName = None

    @model_validator(mode="after")
    def _aligned(self):
        if len(self.images) != len(self.labels):
            raise ValueError("one label per image")
        return self


class RetrievalAudit(Strict):
    kind: Literal["retrieval"]
    index: Name
    images: list[Base64Image] = Field(min_length=1, description="Queries to attack", **FAIL_FAST)
    threat: ThreatModel = ThreatModel()
    k: int = Field(10, ge=1, le=1000)
    steps: int = Field(20, ge=1, le=1000, description="AutoPGD steps of the query attack")
    method: AuditMethod = "auto"
    queries: int = Field(1000, ge=1, le=10_000, description="Square's queries per image of a "
                         "black-box audit")
    model: ModelName = None


AuditRequest = Annotated[RobustnessAudit | RetrievalAudit, Field(discriminator="kind")]


class JobAccepted(BaseModel):
    job_id: str
    kind: str
    state: str
    status_url: str = Field(description="The job (also in the Location header): poll it")
    result_url: str = Field(description="Where the job's product will be once it succeeded: "
                            "/heads/{id} for a linear head, /audits/{id} for an audit")


class Job(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed"]
    progress: float
    stage: str
    attempts: int = Field(description="Starts so far: above 1 after a worker died mid-job")
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


class Head(BaseModel):
    id: str
    model_id: str
    classes: list[str]
    robust: bool
    threat: ThreatModel
    metrics: dict[str, Any]
    created_at: float


class Predictions(BaseModel):
    head_id: str
    labels: list[int]
    classes: list[str]
    probabilities: list[list[float]]


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}
    device: str | None = None  # /readyz: where the encoder runs (cuda or cpu)


class ClaimedThreat(Strict):
    norm: Literal["linf", "l2"]
    eps: float = Field(ge=0, le=64, description="Budget in [0, 1] pixel units")


class UploadedModelCard(Strict):
    """The card sent with a user's encoder to POST /models (the `card` form field, JSON)."""

    name: str = Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Becomes the start of the model's id")
    input_size: int = Field(ge=8, description="Side S of the square input (N, 3, S, S); at "
                            "most MAX_MODEL_INPUT_SIZE")
    threat_model: ClaimedThreat | None = Field(None, description="The robustness it claims, "
                                               "if any (audits check it)")
    description: str = Field("", max_length=1000)
