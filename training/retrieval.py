"""The Fig. 1 scenario: a perturbation within the budget that changes an encoder's neighbours.

The attack needs no labels: it moves a query's embedding away from its clean embedding (minimise
the cosine to it) or toward a chosen target embedding (maximise the cosine), with AutoPGD in pixel
space. Neighbours are the gallery items of highest cosine similarity, as in the paper's figure.
A random perturbation of the same size is measured beside the attack, so that "the neighbours
changed" is read against what noise alone does.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.attacks import APGD, ThreatModel, normalized_step, project
from training.checkpoint import load_encoder
from training.data import load_images
from training.heads import Progress, encode, to_float


def embed(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings (on the CPU) of uint8 or float [0, 1] images, encoder in eval mode."""
    return F.normalize(encode(encoder, images), dim=1)


def nearest(embeddings: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k gallery rows of highest cosine similarity, most similar first."""
    sims = F.normalize(embeddings, dim=1) @ F.normalize(gallery, dim=1).T
    return sims.topk(min(k, gallery.shape[0]), dim=1).indices


def perturb_queries(
    encoder: nn.Module,
    queries: torch.Tensor,
    threat: ThreatModel,
    steps: int = 20,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries moved within the threat model: away from their clean embeddings or, when target
    embeddings (one per query) are given, toward them."""
    if targets is None:
        reference, sign = embed(encoder, queries), -1.0
    else:
        reference, sign = F.normalize(targets.float(), dim=1), 1.0
    reference = reference.to(queries.device)

    def loss_fn(x_adv: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return sign * F.cosine_similarity(encoder(x_adv).float(), ref, dim=1)

    return APGD(loss_fn, threat.norm, threat.eps, steps=steps).perturb(queries, reference)


def random_perturbation(queries: torch.Tensor, threat: ThreatModel, seed: int = 0) -> torch.Tensor:
    """The control: a random point on the boundary of the ball (a random corner for linf)."""
    noise = torch.randn(queries.shape, generator=torch.Generator().manual_seed(seed))
    step = threat.eps * normalized_step(noise.to(queries), threat.norm)
    return project(queries + step, queries, threat.norm, threat.eps)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of a's indices that also appear in b's."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean(1)


def _perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def attack_retrieval(
    encoder: nn.Module,
    queries: torch.Tensor,
    gallery_embeddings: torch.Tensor,
    threat: ThreatModel,
    k: int = 10,
    steps: int = 20,
    targets: torch.Tensor | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query tensors: perturbed queries and neighbours (clean, adversarial, random)."""
    encoder.eval()
    queries = to_float(queries)
    gallery = F.normalize(torch.as_tensor(gallery_embeddings).float().cpu(), dim=1)
    adv = []
    for i in range(0, len(queries), batch_size):
        t = None if targets is None else targets[i : i + batch_size]
        adv.append(perturb_queries(encoder, queries[i : i + batch_size], threat, steps, t))
        if progress is not None:
            progress(min(i + batch_size, len(queries)), len(queries), "retrieval attack")
    x_adv = torch.cat(adv)
    x_rand = random_perturbation(queries, threat)
    clean, e_adv, e_rand = (embed(encoder, x) for x in (queries, x_adv, x_rand))
    result = {
        "adversarial": x_adv,
        "clean_embedding": clean,
        "adversarial_embedding": e_adv,
        "random_embedding": e_rand,
        "neighbours_clean": nearest(clean, gallery, k),
        "neighbours_adversarial": nearest(e_adv, gallery, k),
        "neighbours_random": nearest(e_rand, gallery, k),
        "perturbation_norm": _perturbation_norm(x_adv - queries, threat.norm),
    }
    if targets is not None:
        result["cosine_to_target"] = (F.normalize(targets.float().cpu(), dim=1) * e_adv).sum(1)
    return result


def summarize(result: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over queries of what `attack_retrieval` measured, JSON-ready."""
    clean_nn = result["neighbours_clean"]
    summary = {"max_perturbation_norm": result["perturbation_norm"].max().item()}
    for kind in ("adversarial", "random"):
        after = result[f"neighbours_{kind}"]
        summary[f"topk_overlap_{kind}"] = _overlap(clean_nn, after).mean().item()
        summary[f"top1_changed_{kind}"] = (clean_nn[:, 0] != after[:, 0]).float().mean().item()
        cos = (result["clean_embedding"] * result[f"{kind}_embedding"]).sum(1)
        summary[f"cosine_to_clean_{kind}"] = cos.mean().item()
    if "cosine_to_target" in result:
        summary["cosine_to_target_adversarial"] = result["cosine_to_target"].mean().item()
    return summary


def retrieval_audit(
    encoder: nn.Module,
    queries: torch.Tensor,
    gallery_embeddings: torch.Tensor | np.ndarray,
    threat: ThreatModel,
    k: int = 10,
    steps: int = 20,
    targets: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict:
    """How far a budget-bounded attack moves the queries' top-k neighbours in the gallery.

    Returns the mean top-k overlap between clean and attacked neighbour sets (1 = unchanged),
    the fraction of queries whose top-1 neighbour changed, the same for a random perturbation
    of the same size, and the settings. Puts the encoder in eval mode.
    """
    result = attack_retrieval(
        encoder, queries, gallery_embeddings, threat, k, steps, targets, progress=progress
    )
    return {**_settings(len(queries), threat, k, steps, targets is not None), **summarize(result)}


def _settings(num_queries: int, threat: ThreatModel, k: int, steps: int, toward: bool) -> dict:
    return {"num_queries": num_queries, "k": k, "steps": steps, "norm": threat.norm,
            "eps": threat.eps, "mode": "toward" if toward else "away", "attack": "apgd"}


def retrieval_demo(
    encoders: dict[str, str | Path],
    data: str,
    out: str | Path,
    threat: ThreatModel,
    k: int = 5,
    num_queries: int = 32,
    gallery_size: int = 5000,
    steps: int = 20,
    toward: bool = False,
    show: int = 0,
    image_size: int = 32,
    seed: int = 0,
) -> dict:
    """Fig. 1 for several encoders (name -> run dir or checkpoint) side by side.

    Queries are random test images, the gallery random training images; with `toward`, each
    query is pushed toward a random gallery image of another class. Writes retrieval.json (the
    summary per encoder) and retrieval.png (query `show` and its neighbours before and after).
    """
    from training.figures import plot_neighbours  # matplotlib: not for the worker's audits

    gen = torch.Generator().manual_seed(seed)
    train = load_images(data, "train", image_size)
    test = load_images(data, "test", image_size)
    gallery = train.subset(torch.randperm(len(train), generator=gen)[:gallery_size])
    queries = test.subset(torch.randperm(len(test), generator=gen)[:num_queries])
    target_idx = None
    if toward:  # a random gallery image whose class differs from the query's
        other = gallery.labels[None, :] != queries.labels[:, None]
        target_idx = torch.multinomial(other.float(), 1, generator=gen).squeeze(1)
    summary, rows, toward_title = {}, [], ""
    if target_idx is not None:
        toward_title = f" -> {gallery.classes[gallery.labels[target_idx[show]]]}"
    for name, path in encoders.items():
        encoder, _ = load_encoder(path)
        targets = None if target_idx is None else embed(encoder, gallery.images[target_idx])
        result = attack_retrieval(encoder, queries.images, embed(encoder, gallery.images),
                                  threat, k, steps, targets)
        summary[name] = {"checkpoint": str(path), **summarize(result)}
        rows += [(f"{name}: query", to_float(queries.images[show]),
                  result["neighbours_clean"][show].tolist()),
                 (f"{name}: perturbed{toward_title}", result["adversarial"][show],
                  result["neighbours_adversarial"][show].tolist())]
    out = Path(out)
    plot_neighbours(rows, gallery.images, gallery.labels, gallery.classes,
                    int(queries.labels[show]), out / "retrieval.png")
    report = {"settings": {**_settings(num_queries, threat, k, steps, toward),
                           "gallery_size": len(gallery), "data": data, "seed": seed},
              "encoders": summary}
    (out / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
