"""`byorl demo-gallery`: the CIFAR-10 test images as one gallery per served model, through the
API (the galleries belong to the running service), so that the demo page shows Fig. 1.

The galleries of one *group* hold the same keys (`test-00000`, ...) and metadata (`label`, the
class name) and are named `GROUP--MODEL_ID`: the page shows the galleries of a group side by
side, one column per model.
"""

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np

GROUP_SEPARATOR = "--"
BATCH = 256  # images per add request (within MAX_BULK_IMAGES and the body limit)


def gallery_name(group: str, model_id: str) -> str:
    return f"{group}{GROUP_SEPARATOR}{model_id}"[:64]


def read_images(source: str, per_class: int, skip: int = 0) -> tuple[list[bytes], list[str]]:
    """(encoded images, class names) of `per_class` test images of each class, after its first
    `skip`: the shipped sample's JPEG bytes as they are (`.npz`), or any source of
    `training.data` (a CIFAR-10 `.tar.gz` or ImageFolder) re-encoded as PNG."""
    if source.endswith(".npz"):
        with np.load(source) as f:
            jpeg, offsets, labels, classes = f["jpeg"], f["offsets"], f["labels"], f["classes"]
        blobs = [jpeg[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(labels))]
        names = [str(classes[y]) for y in labels]
    else:
        from PIL import Image

        from byorl.training.data import load_images

        data = load_images(source, "test")
        names = [data.classes[y] for y in data.labels.tolist()]
        blobs = []
        for image in data.images.numpy():
            buf = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
    counts: dict[str, int] = {}
    chosen = []
    for i, name in enumerate(names):
        seen = counts[name] = counts.get(name, 0) + 1
        if skip < seen <= skip + per_class:
            chosen.append(i)
    return [blobs[i] for i in chosen], [names[i] for i in chosen]


class Api:
    """A tiny JSON client of the service (the standard library only)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url, self.headers = url.rstrip("/"), {"Content-Type": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key

    def __call__(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, self.headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def build_demo_galleries(api: Api, source: str, per_class: int = 100, group: str = "cifar10",
                         replace: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """One gallery per served model of the same images, keys and labels; returns the names."""
    blobs, names = read_images(source, per_class)
    encoded = [base64.b64encode(b).decode() for b in blobs]
    keys = [f"test-{i:05d}" for i in range(len(blobs))]
    status, models = api("GET", "/models")
    if status != 200:
        raise RuntimeError(f"GET /models answered {status}: {models}")
    made = []
    for model in models:
        name = gallery_name(group, model["model_id"])
        if replace:
            api("DELETE", f"/indexes/{name}")
        status, body = api("POST", "/indexes", {"name": name, "model": model["model_id"]})
        if status != 201:
            raise RuntimeError(f"creating {name}: {status} {body} (--replace rebuilds it)")
        for start in range(0, len(keys), BATCH):
            part = slice(start, start + BATCH)
            status, body = api("POST", f"/indexes/{name}/items", {
                "keys": keys[part], "images": encoded[part],
                "metadata": [{"label": n} for n in names[part]]})
            if status != 201:
                raise RuntimeError(f"adding to {name}: {status} {body}")
        echo(f"{name}: {len(keys)} images of {len(set(names))} classes ({model['model_id']})")
        made.append(name)
    return made


def audit_demo_galleries(api: Api, source: str, names: list[str], per_class: int, queries: int,
                         k: int, eps: float, steps: int, echo: Callable[[str], None] = print
                         ) -> dict[str, dict]:
    """The retrieval audit of each gallery with the same held-out test images as queries (the
    images after each class's first `per_class`, which the galleries hold): what the page
    shows for one query, measured over `queries`."""
    per = max(1, -(-queries // 10))
    blobs, _ = read_images(source, per, skip=per_class)
    images = [base64.b64encode(b).decode() for b in blobs[:queries]]
    summaries = {}
    for name in names:
        status, job = api("POST", "/audits", {"kind": "retrieval", "index": name, "k": k,
                                              "steps": steps, "images": images,
                                              "threat": {"norm": "linf", "eps": eps}})
        if status != 202:
            raise RuntimeError(f"auditing {name}: {status} {job}")
        while (state := api("GET", job["status_url"])[1])["state"] in ("queued", "running"):
            time.sleep(1)
        if state["state"] != "succeeded":
            raise RuntimeError(f"the audit of {name} failed: {state['error']}")
        s = api("GET", job["result_url"])[1]
        summaries[name] = s
        echo(f"{name}: {s['num_queries']} queries, linf eps {eps * 255:g}/255, AutoPGD "
             f"{steps} steps ({s['access']['method']}): top-{k} overlap "
             f"{s['topk_overlap_adversarial']:.3f} attacked, {s['topk_overlap_random']:.3f} "
             f"under noise of the same size; top-1 changed {s['top1_changed_adversarial']:.1%}")
    return summaries
