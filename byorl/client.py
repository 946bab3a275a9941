"""A Python client of the service: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

    from byorl import Client

    with Client("http://127.0.0.1:8000") as c:
        vectors = c.embed(["cat.jpg"]).vectors              # (1, D) float32, unit length
        c.create_gallery("pets")
        c.add("pets", {"cat": "cat.jpg", "dog": "dog.png"}, metadata={"cat": {"kind": "cat"}})
        hits = c.search("pets", ["query.jpg"], k=5)[0]       # [Hit(key, score, metadata)]
        cats = c.search("pets", ["query.jpg"], k=5, filter={"kind": "cat"})[0]

Images are paths, bytes of a PNG/JPEG/WebP file, PIL images or uint8 arrays (H, W, 3) or
(3, H, W). A refused request raises `ServiceError` carrying the service's status, error code
and message; 429 (queue full) and 503 (job queue unreachable) are retried with exponential
backoff that honours Retry-After. Lists page automatically; jobs return a `JobHandle` whose
`wait` polls until the job ends.

Every operation is written once, as a plan: a generator that yields the requests it needs (and
pauses) and returns the typed result. `Client` runs plans with blocking httpx, `AsyncClient`
with asyncio, so the two expose the same methods with the same behaviour.
"""

import asyncio
import base64
import functools
import io
import json
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from byorl import gallery_io
from byorl.gallery_io import ExportError, ImportSummary

RETRY_STATUSES = (429, 503)
PAGE = 1000  # the service's largest page
ADD_BATCH = 256  # images per add request (within MAX_BULK_IMAGES and the body limit)
IMPORT_BATCH = 64  # files per add request of an import
IMPORT_BATCH_BYTES = 4 * 2**20  # and at most these bytes of files (base64 adds a third)
RESTORE_BATCH = 256  # items per POST /indexes/{name}/vectors (halved on a 413)
# A refusal of a whole batch that splitting cannot help: the gallery, the key or the model.
FATAL = (401, 403, 404, 429, 503)


class ServiceError(Exception):
    """A request the service refused: `status`, its stable `code` and the `message`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class JobFailed(Exception):
    """A job that ended in the `failed` state (`job.error` says why)."""

    def __init__(self, job: "Job"):
        super().__init__(f"job {job.id} ({job.kind}) failed: {job.error}")
        self.job = job


@dataclass(frozen=True)
class Embeddings:
    model_id: str
    normalized: bool
    vectors: np.ndarray  # (N, D) float32


@dataclass(frozen=True)
class Hit:
    key: str
    score: float  # cosine similarity
    metadata: Any = None


@dataclass(frozen=True)
class Gallery:
    name: str
    model_id: str
    dim: int
    factory: str
    count: int


@dataclass(frozen=True)
class Item:
    key: str
    metadata: Any = None


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    progress: float
    stage: str
    attempts: int
    result: dict | None
    error: str | None
    params: dict = field(repr=False, default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed")


@dataclass(frozen=True)
class Predictions:
    head_id: str
    labels: list[int]
    classes: list[str]
    probabilities: np.ndarray  # (N, classes)


@dataclass(frozen=True)
class Request:
    """One HTTP request of a plan; a non-2xx answer raises ServiceError (after retries)."""

    method: str
    path: str
    json: Any = None
    params: dict | None = None
    files: Any = None
    data: dict | None = None


@dataclass(frozen=True)
class Pause:
    """A plan waiting (between polls of a job)."""

    seconds: float


Plan = Generator[Request | Pause, Any, Any]


def encode_image(image) -> str:
    """An image as the base64 text the service takes: a path or file bytes as they are, a PIL
    image or a uint8 array (H, W, 3) or (3, H, W) as PNG."""
    if isinstance(image, str | Path):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    else:
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or 3 not in (image.shape[0],
                                                                        image.shape[-1]):
                raise ValueError(f"an image array must be uint8 (H, W, 3) or (3, H, W), not "
                                 f"{image.dtype} {image.shape}")
            image = Image.fromarray(image.transpose(1, 2, 0) if image.shape[0] == 3
                                    and image.shape[-1] != 3 else image)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode()


def _job(body: dict) -> Job:
    return Job(**{k: body.get(k) for k in ("id", "kind", "state", "progress", "stage",
                                            "attempts", "result", "error")},
               params=body.get("params") or {})


def _paged(path: str, build: Callable[[dict], Any]) -> Plan:
    """Every item of a paged listing, following next_offset."""
    out, offset = [], 0
    while offset is not None:
        page = yield Request("GET", path, params={"offset": offset, "limit": PAGE})
        out += [build(item) for item in page["items"]]
        offset = page["next_offset"]
    return out


# -- the operations, each a plan ------------------------------------------------------------------


def embed(images: Iterable, *, model: str | None = None, normalize: bool = True) -> Plan:
    """Embeddings of images (unit length unless `normalize` is false)."""
    body = yield Request("POST", "/embed", {"images": [encode_image(i) for i in images],
                                            "model": model, "normalize": normalize})
    return Embeddings(body["model_id"], body["normalized"],
                      np.asarray(body["embeddings"], np.float32))


def search(gallery: str, images: Iterable | None = None, *, embeddings=None, k: int = 10,
           model: str | None = None, filter: Mapping[str, Any] | None = None) -> Plan:
    """The k nearest items of each query (images, or vectors in `embeddings`), best first.
    `filter`: only items whose metadata matches, e.g. {"source": "web", "label": {"in": [1, 2]}}
    (equality, or membership with "in", on top-level fields; all must hold); the k hits are the
    k nearest of those."""
    query = ({"images": [encode_image(i) for i in images]} if images is not None else
             {"embeddings": np.asarray(embeddings, np.float32).tolist()})
    if filter is not None:  # sent only when given (a server without filters refuses the field)
        query["filter"] = dict(filter)
    body = yield Request("POST", "/search", {"index": gallery, "k": k, "model": model, **query})
    return [[Hit(**hit) for hit in row] for row in body["results"]]


def create_gallery(name: str, *, model: str | None = None, factory: str = "Flat") -> Plan:
    """An empty gallery for the named model's embeddings (default: the service's first)."""
    body = yield Request("POST", "/indexes", {"name": name, "model": model, "factory": factory})
    return Gallery(**body)


def gallery(name: str) -> Plan:
    return Gallery(**(yield Request("GET", f"/indexes/{name}")))


def galleries() -> Plan:
    """Every gallery, by name."""
    return (yield from _paged("/indexes", lambda g: Gallery(**g)))


def delete_gallery(name: str) -> Plan:
    yield Request("DELETE", f"/indexes/{name}")


def add(gallery: str, images: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
        model: str | None = None, batch: int = ADD_BATCH) -> Plan:
    """Add images under their keys (a mapping key -> image), with optional JSON metadata per
    key, in requests of `batch` images; each request is stored whole or not at all. Returns
    the gallery's item count."""
    keys, count = list(images), None
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        meta = None if metadata is None else [metadata.get(key) for key in part]
        body = yield Request("POST", f"/indexes/{gallery}/items", {
            "keys": part, "images": [encode_image(images[key]) for key in part],
            "metadata": meta, "model": model})
        count = body["count"]
    return count


def items(gallery: str) -> Plan:
    """Every item of a gallery (key and metadata), in insertion order."""
    return (yield from _paged(f"/indexes/{gallery}/items", lambda i: Item(**i)))


def keys(gallery: str) -> Plan:
    """Every key of a gallery (a set)."""
    return set((yield from _paged(f"/indexes/{gallery}/items", lambda i: i["key"])))


def export_page(gallery: str, offset: int = 0, limit: int = PAGE) -> Plan:
    """One page of a gallery's items with their stored vectors and pixels: the page's fields,
    `vectors` (n, dim) float32 and `pixels` (n, 3, S, S) uint8 decoded (fewer than `limit`
    items when more would pass the service's response limit: follow `next_offset`)."""
    body = yield Request("GET", f"/indexes/{gallery}/export",
                         params={"offset": offset, "limit": limit})
    n = len(body["items"])
    body["vectors"] = np.frombuffer(base64.b64decode(body["vectors"]), "<f4").reshape(
        n, body["dim"])
    body["pixels"] = np.frombuffer(base64.b64decode(body["pixels"]), np.uint8).reshape(
        n, *(body["pixel_shape"] or []))
    return body


def add_vectors(gallery: str, keys: list[str], vectors, pixels, *, model_id: str,
                onnx_sha256: str, metadata: list | None = None) -> Plan:
    """Store items from vectors and pixels (an export's) without embedding them: the gallery
    must hold vectors of `model_id`, served from the file of card hash `onnx_sha256` (409
    otherwise). Returns the gallery's item count."""
    body = yield Request("POST", f"/indexes/{gallery}/vectors", {
        "keys": list(keys), "metadata": None if metadata is None else list(metadata),
        "vectors": base64.b64encode(np.ascontiguousarray(vectors, "<f4").tobytes()).decode(),
        "pixels": base64.b64encode(np.ascontiguousarray(pixels, np.uint8).tobytes()).decode(),
        "model_id": model_id, "onnx_sha256": onnx_sha256})
    return body["count"]


def _gallery_for(name: str, create: bool, model: str | None, factory: str) -> Plan:
    """The gallery, created first when it does not exist and `create` says so."""
    try:
        return Gallery(**(yield Request("GET", f"/indexes/{name}")))
    except ServiceError as exc:
        if exc.code != "index_not_found" or not create:
            raise
    return (yield from create_gallery(name, model=model, factory=factory))


def _add_isolating(gallery: str, batch: list[tuple[str, bytes]], summary: ImportSummary,
                   model: str | None) -> Plan:
    """Add a batch of files; a batch the service refuses (all or nothing) is split in halves
    until the files it refuses are alone, each then recorded with the service's reason (a key
    already present, added since the import began, counts as present)."""
    try:
        yield Request("POST", f"/indexes/{gallery}/items", {
            "keys": [k for k, _ in batch], "images": [encode_image(d) for _, d in batch],
            "model": model})
        summary.added += len(batch)
        return
    except ServiceError as exc:
        if exc.status in FATAL or exc.code == "model_mismatch" or exc.status >= 500:
            raise
        if len(batch) == 1:
            if exc.code == "duplicate_key":
                summary.present += 1
            else:
                summary.failed.append((batch[0][0], f"{exc.code}: {exc.message}"))
            return
    half = len(batch) // 2
    yield from _add_isolating(gallery, batch[:half], summary, model)
    yield from _add_isolating(gallery, batch[half:], summary, model)


def import_images(gallery: str, source: str | Path, *, batch: int = IMPORT_BATCH,
                  create: bool = False, model: str | None = None, factory: str = "Flat",
                  max_file_bytes: int = gallery_io.MAX_FILE_BYTES,
                  progress: Callable[[int, int, str], None] | None = None) -> Plan:
    """Add every image of a folder (recursively) or tar archive under its relative path
    (`byorl.gallery_io`), in requests of `batch` files. Resumable: keys already in the gallery
    are skipped. A file that fails (corrupt, unsupported format, too large, refused by the
    service) is recorded with its reason and the rest go on. Returns an ImportSummary."""
    yield from _gallery_for(gallery, create, model, factory)
    present = yield from keys(gallery)
    with gallery_io.open_source(source) as files:
        summary, pending, size, shown = ImportSummary(files=len(files)), [], 0, 0

        def flush() -> Plan:
            nonlocal pending, size, shown
            if pending:
                yield from _add_isolating(gallery, pending, summary, model)
            pending, size = [], 0
            settled = summary.added + summary.present + len(summary.failed)
            if progress is not None and settled > shown:  # files whose fate is known
                progress(settled, len(files), "importing")
                shown = settled

        for f in files:
            problem = None
            if f.key in present:
                summary.present += 1
            elif f.size > max_file_bytes:
                problem = f"too large: {f.size} bytes (the limit is {max_file_bytes})"
            else:
                data = f.read()
                problem = gallery_io.image_problem(f.key, data, max_file_bytes)
                if problem is None:
                    if pending and size + len(data) > IMPORT_BATCH_BYTES:
                        yield from flush()
                    pending.append((f.key, data))
                    size += len(data)
            if problem is not None:
                summary.failed.append((f.key, problem))
            if len(pending) >= batch or not pending:
                yield from flush()
        yield from flush()
    return summary


def export_gallery(gallery: str, out: str | Path, *, page: int = PAGE,
                   progress: Callable[[int, int, str], None] | None = None) -> Plan:
    """Write a gallery to the folder `out` (new or empty), page by page (memory holds one
    page): its items, vectors, pixels and a manifest naming the model and its card hash
    (`byorl.gallery_io`). The gallery must not be written to meanwhile (ExportError when its
    count changed). Returns the manifest."""
    writer, offset, first, body = gallery_io.ExportWriter(Path(out)), 0, None, None
    try:
        while offset is not None:
            body = yield from export_page(gallery, offset, page)
            first = first or body
            writer.write(body["items"], body["vectors"], body["pixels"])
            offset = body["next_offset"]
            if progress is not None:
                progress(writer.rows, body["count"], "exporting")
        if body["count"] != writer.rows or body["count"] != first["count"]:
            raise ExportError(f"gallery {gallery!r} changed during the export ({first['count']} "
                              f"items, then {body['count']}; {writer.rows} read): export again "
                              "while nothing writes to it")
    except BaseException:
        writer.abort()
        raise
    manifest = {"format": gallery_io.FORMAT, "version": gallery_io.VERSION, "name": gallery,
                "model_id": body["model_id"], "onnx_sha256": body["onnx_sha256"],
                "factory": body["factory"], "dim": body["dim"], "count": writer.rows,
                "pixel_shape": first["pixel_shape"] or body["pixel_shape"],
                "items": gallery_io.ITEMS, "vectors": gallery_io.VECTORS,
                "pixels": gallery_io.PIXELS}
    writer.finish(manifest)
    return manifest


def restore_gallery(source: str | Path, gallery: str, *, batch: int = RESTORE_BATCH,
                    progress: Callable[[int, int, str], None] | None = None) -> Plan:
    """Store an export's items in a gallery (created with the export's model and factory when
    missing) without embedding them. Refused (ExportError, before anything is created) unless
    the service serves the export's model from the same file (same card hash). Resumable: keys
    already there are skipped. Requests of `batch` items, halved on a 413. Returns the
    gallery's item count."""
    export = gallery_io.read_export(source)
    m = export.manifest
    cards = {c["model_id"]: c for c in (yield Request("GET", "/models"))}
    card = cards.get(m["model_id"])
    if card is None or not card.get("available", True):
        raise ExportError(f"the export holds vectors of model {m['model_id']!r}, which the "
                          "service does not serve: register that model first")
    if m["onnx_sha256"] is None or card.get("onnx_sha256") != m["onnx_sha256"]:
        raise ExportError(f"the export's model {m['model_id']!r} has card hash "
                          f"{m['onnx_sha256']}, the served one {card.get('onnx_sha256')}: "
                          "other weights, whose vectors would not match")
    target = yield from _gallery_for(gallery, True, m["model_id"], m["factory"])
    if target.model_id != m["model_id"]:
        raise ExportError(f"gallery {gallery!r} holds vectors of model {target.model_id!r}, "
                          f"the export of {m['model_id']!r}")
    present = yield from keys(gallery)
    todo = [i for i, k in enumerate(export.keys) if k not in present]
    count, done, step = target.count, len(export.keys) - len(todo), batch
    start = 0
    while start < len(todo):
        rows = todo[start:start + step]
        try:
            count = yield from add_vectors(
                gallery, [export.keys[i] for i in rows], export.vectors[rows],
                export.pixels[rows], model_id=m["model_id"], onnx_sha256=m["onnx_sha256"],
                metadata=[export.metadata[i] for i in rows])
        except ServiceError as exc:
            if exc.status != 413 or step == 1:
                raise
            step = max(1, step // 2)  # over the body or item limit: smaller requests
            continue
        start += len(rows)
        done += len(rows)
        if progress is not None:
            progress(done, len(export.keys), "restoring")
    return count


def remove(gallery: str, key: str) -> Plan:
    """Remove one item; returns the gallery's item count."""
    return (yield Request("DELETE", f"/indexes/{gallery}/items/{key}"))["count"]


def fit_head(classes: list[str], labels: list[int], images: Iterable | None = None, *,
             gallery: str | None = None, keys: list[str] | None = None, **options) -> Plan:
    """Start fitting a linear head on labeled images (or on keys of a gallery); `options`
    are the request's (robust, threat, epochs, ...). Returns the job's handle."""
    body = {"classes": classes, "labels": labels, **options}
    if images is not None:
        body["images"] = [encode_image(i) for i in images]
    else:
        body |= {"index": gallery, "keys": keys}
    return (yield Request("POST", "/linear-head", body))


def head(head_id: str) -> Plan:
    return (yield Request("GET", f"/heads/{head_id}"))


def heads() -> Plan:
    return (yield from _paged("/heads", dict))


def delete_head(head_id: str) -> Plan:
    yield Request("DELETE", f"/heads/{head_id}")


def predict(head_id: str, images: Iterable) -> Plan:
    body = yield Request("POST", f"/heads/{head_id}/predict",
                         {"images": [encode_image(i) for i in images]})
    return Predictions(body["head_id"], body["labels"], body["classes"],
                       np.asarray(body["probabilities"], np.float32))


def audit(kind: str, images: Iterable, **options) -> Plan:
    """Start an audit: "robustness" (head_id, labels, threat, mode, method) or "retrieval"
    (gallery, threat, k, steps, method, queries). Returns the job's handle."""
    if "gallery" in options:
        options["index"] = options.pop("gallery")
    return (yield Request("POST", "/audits", {"kind": kind,
                                              "images": [encode_image(i) for i in images],
                                              **options}))


def report(audit_id: str) -> Plan:
    return (yield Request("GET", f"/audits/{audit_id}"))


def job(job_id: str) -> Plan:
    return _job((yield Request("GET", f"/jobs/{job_id}")))


def jobs() -> Plan:
    return (yield from _paged("/jobs", _job))


def wait(job_id: str, *, timeout: float | None = None, poll: float = 1.0,
         progress: Callable[[Job], None] | None = None) -> Plan:
    """Poll a job until it ends: the finished job (JobFailed when it failed, TimeoutError
    past `timeout` seconds); `progress` sees every poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        current = _job((yield Request("GET", f"/jobs/{job_id}")))
        if progress is not None:
            progress(current)
        if current.state == "failed":
            raise JobFailed(current)
        if current.state == "succeeded":
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {current.state} after {timeout} s")
        yield Pause(poll)


def models() -> Plan:
    """The served models' cards, the default first."""
    return (yield Request("GET", "/models"))


def upload_model(onnx: str | Path | bytes, card: dict) -> Plan:
    """Register an ONNX encoder (card: name, input_size, optional threat_model,
    description); returns its served card."""
    data = Path(onnx).read_bytes() if isinstance(onnx, str | Path) else bytes(onnx)
    return (yield Request("POST", "/models", files={"file": ("encoder.onnx", data)},
                          data={"card": json.dumps(card)}))


def delete_model(model_id: str) -> Plan:
    yield Request("DELETE", f"/models/{model_id}")


OPERATIONS = [embed, search, create_gallery, gallery, galleries, delete_gallery, add, items,
              keys, export_page, add_vectors, import_images, export_gallery, restore_gallery,
              remove, fit_head, head, heads, delete_head, predict, audit, report, job, jobs,
              wait, models, upload_model, delete_model]
STARTS_A_JOB = {fit_head, audit}


# -- running plans --------------------------------------------------------------------------------


def _error(response: httpx.Response) -> ServiceError:
    try:
        error = response.json()["error"]
        return ServiceError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ServiceError(response.status_code, "http_error", response.text[:500])


def _retry_delay(response: httpx.Response, attempt: int, backoff: float) -> float:
    """Seconds to wait before retrying: Retry-After when the service says, else exponential."""
    try:
        return max(float(response.headers["Retry-After"]), 0.0)
    except (KeyError, ValueError):
        return backoff * 2**attempt


def _body(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def _headers(api_key: str | None) -> dict:
    return {"X-API-Key": api_key} if api_key else {}


@dataclass(frozen=True)
class JobHandle:
    """A job the service accepted: its id, where it is polled and where its product lands."""

    client: Any = field(repr=False)
    job_id: str
    kind: str
    status_url: str
    result_url: str

    def wait(self, timeout: float | None = None, poll: float = 1.0, progress=None):
        """The finished job (awaitable with AsyncClient)."""
        return self.client.wait(self.job_id, timeout=timeout, poll=poll, progress=progress)


def _handle(client, accepted: dict) -> JobHandle:
    return JobHandle(client, accepted["job_id"], accepted["kind"], accepted["status_url"],
                     accepted["result_url"])


class Client:
    """The service over blocking HTTP. `retries` tries again on 429/503 (Retry-After, else
    `backoff` × 2^attempt seconds)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 600, retries: int = 5, backoff: float = 0.5):
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=_headers(api_key))
        self.retries, self.backoff = retries, backoff

    def _send(self, r: Request) -> Any:
        for attempt in range(self.retries + 1):
            response = self.http.request(r.method, r.path, json=r.json, params=r.params,
                                         files=r.files, data=r.data)
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                break
            time.sleep(_retry_delay(response, attempt, self.backoff))
        if response.is_error:
            raise _error(response)
        return _body(response)

    def _run(self, plan: Plan) -> Any:
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    time.sleep(step.seconds)
                    step = plan.send(None)
                else:
                    try:
                        answer = self._send(step)
                    except ServiceError as exc:  # the plan may handle a refusal
                        step = plan.throw(exc)
                        continue
                    step = plan.send(answer)
        except StopIteration as done:
            return done.value

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same methods as `Client`, awaitable (asyncio)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 600, retries: int = 5, backoff: float = 0.5):
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_headers(api_key))
        self.retries, self.backoff = retries, backoff

    async def _send(self, r: Request) -> Any:
        for attempt in range(self.retries + 1):
            response = await self.http.request(r.method, r.path, json=r.json, params=r.params,
                                               files=r.files, data=r.data)
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                break
            await asyncio.sleep(_retry_delay(response, attempt, self.backoff))
        if response.is_error:
            raise _error(response)
        return _body(response)

    async def _run(self, plan: Plan) -> Any:
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    step = plan.send(None)
                else:
                    try:
                        answer = await self._send(step)
                    except ServiceError as exc:  # the plan may handle a refusal
                        step = plan.throw(exc)
                        continue
                    step = plan.send(answer)
        except StopIteration as done:
            return done.value

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _sync_method(operation):
    @functools.wraps(operation)
    def method(self, *args, **kwargs):
        result = self._run(operation(*args, **kwargs))
        return _handle(self, result) if operation in STARTS_A_JOB else result

    return method


def _async_method(operation):
    @functools.wraps(operation)
    async def method(self, *args, **kwargs):
        result = await self._run(operation(*args, **kwargs))
        return _handle(self, result) if operation in STARTS_A_JOB else result

    return method


for _op in OPERATIONS:
    setattr(Client, _op.__name__, _sync_method(_op))
    setattr(AsyncClient, _op.__name__, _async_method(_op))
