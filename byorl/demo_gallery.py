"""`byorl demo-gallery`: the CIFAR-10 test images as one gallery per served model, through the
API (the galleries belong to the running service), so that the demo page shows Fig. 1.

The galleries of one *group* hold the same keys (`test-00000`, ...) and metadata (`label`, the
class name) and are named `GROUP--MODEL_ID`: the page shows the galleries of a group side by
side, one column per model.
"""

import io
from collections.abc import Callable

import numpy as np

from byorl.client import Client

GROUP_SEPARATOR = "--"


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


def build_demo_galleries(client: Client, source: str, per_class: int = 100,
                         group: str = "cifar10", replace: bool = False,
                         echo: Callable[[str], None] = print) -> list[str]:
    """One gallery per served model of the same images, keys and labels; returns the names."""
    blobs, names = read_images(source, per_class)
    keys = [f"test-{i:05d}" for i in range(len(blobs))]
    made = []
    for model in client.models():
        name = gallery_name(group, model["model_id"])
        if replace and name in {g.name for g in client.galleries()}:
            client.delete_gallery(name)
        client.create_gallery(name, model=model["model_id"])
        client.add(name, dict(zip(keys, blobs, strict=True)),
                   metadata={key: {"label": n} for key, n in zip(keys, names, strict=True)})
        echo(f"{name}: {len(keys)} images of {len(set(names))} classes ({model['model_id']})")
        made.append(name)
    return made


def audit_demo_galleries(client: Client, source: str, names: list[str], per_class: int,
                         queries: int, k: int, eps: float, steps: int,
                         echo: Callable[[str], None] = print) -> dict[str, dict]:
    """The retrieval audit of each gallery with the same held-out test images as queries (the
    images after each class's first `per_class`, which the galleries hold): what the page
    shows for one query, measured over `queries`."""
    per = max(1, -(-queries // 10))
    blobs, _ = read_images(source, per, skip=per_class)
    summaries = {}
    for name in names:
        job = client.audit("retrieval", blobs[:queries], gallery=name, k=k, steps=steps,
                           threat={"norm": "linf", "eps": eps})
        job.wait()
        s = summaries[name] = client.report(job.job_id)
        echo(f"{name}: {s['num_queries']} queries, linf eps {eps * 255:g}/255, AutoPGD "
             f"{steps} steps ({s['access']['method']}): top-{k} overlap "
             f"{s['topk_overlap_adversarial']:.3f} attacked, {s['topk_overlap_random']:.3f} "
             f"under noise of the same size; top-1 changed {s['top1_changed_adversarial']:.1%}")
    return summaries
