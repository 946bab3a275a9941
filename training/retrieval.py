"""The Fig. 1 scenario: a perturbation within the budget that changes an encoder's neighbours.

The attack needs no labels: it moves a query's embedding away from its clean embedding (minimise
the cosine to it) or toward a chosen target embedding (maximise the cosine), with AutoPGD in pixel
space. Neighbours are the gallery items of highest cosine similarity, as in the paper's figure.
A random perturbation of the same size is measured beside the attack, so that "the neighbours
changed" is read against what noise alone does.
"""

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch
import torchattacks
from PIL import Image
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import APGD, ThreatModel, normalized_step, project
from byorl.training.checkpoint import load_encoder
from byorl.training.data import load_images
from byorl.training.linear_classifier import Progress, encode, to_float


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


class _CosineToClean(nn.Module):
    """Two 'logits' for Square: the cosine of an image's embedding to its clean one (class 0)
    and -1, which no cosine goes below: Square's margin loss is then the cosine plus 1, which it
    lowers until its queries run out."""

    def __init__(self, encoder: nn.Module, reference: torch.Tensor):
        super().__init__()
        self.encoder, self.reference = encoder, reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(self.encoder(x).float(), self.reference, dim=1)
        return torch.stack([cos, torch.full_like(cos, -1.0)], 1)


def square_queries(encoder: nn.Module, queries: torch.Tensor, threat: ThreatModel,
                   n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """Queries moved away from their clean embeddings by torchattacks' Square: forward passes
    only (a black-box attack), one query image at a time (its reference is its own)."""
    out = []
    for x in queries.split(1):
        target = _CosineToClean(encoder, embed(encoder, x).to(x.device)).eval()
        attack = torchattacks.Square(target, norm={"linf": "Linf", "l2": "L2"}[threat.norm],
                                     eps=threat.eps, n_queries=n_queries, n_restarts=1, seed=seed)
        with torch.random.fork_rng():  # seeded as Square's own entry point seeds
            attack.init_hyperparam(x)
            torch.manual_seed(seed)
            # its best point, not `attack(x, y)`, which keeps only points that changed class
            # (none here: the loss is a cosine, with no class to change)
            _, best = attack.attack_single_run(x, torch.zeros(1, dtype=torch.long,
                                                              device=x.device))
        out.append(best.detach())
    return torch.cat(out)


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
    attack: str = "apgd",
) -> dict[str, torch.Tensor]:
    """Per-query tensors: perturbed queries and neighbours (clean, adversarial, random).

    attack "apgd" (white-box, `steps` steps) or "square" (black-box, `steps` queries per image;
    away from the clean embedding only)."""
    if attack not in ("apgd", "square") or (attack == "square" and targets is not None):
        raise ValueError(f"attack must be apgd, or square without targets: {attack!r}")
    encoder.eval()
    queries = to_float(queries)
    gallery = F.normalize(torch.as_tensor(gallery_embeddings).float().cpu(), dim=1)
    adv = []
    for i in range(0, len(queries), batch_size):
        t = None if targets is None else targets[i : i + batch_size]
        chunk = queries[i : i + batch_size]
        adv.append(perturb_queries(encoder, chunk, threat, steps, t) if attack == "apgd"
                   else square_queries(encoder, chunk, threat, steps))
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


def png_base64(image: torch.Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a base64 PNG (rounded to 8 bits)."""
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def query_details(queries: torch.Tensor, result: dict[str, torch.Tensor],
                  gallery_embeddings: torch.Tensor, n: int) -> list[dict]:
    """What the attack did to each of the first n queries: gallery rows and cosines of its
    neighbours before and after, their top-k overlap, the perturbation's size, the attacked
    image and the perturbation amplified to fill [0, 1] (grey is zero) as base64 PNGs."""
    gallery = F.normalize(torch.as_tensor(gallery_embeddings).float().cpu(), dim=1)
    queries = to_float(queries)[:n].cpu()
    details = []
    for i in range(min(n, len(queries))):
        row = {}
        for kind in ("clean", "adversarial"):
            idx = result[f"neighbours_{kind}"][i]
            scores = gallery[idx] @ result[f"{kind}_embedding"][i]
            row[f"neighbours_{kind}"] = [[int(j), round(float(c), 6)]
                                         for j, c in zip(idx, scores, strict=True)]
        delta = result["adversarial"][i].cpu() - queries[i]
        scale = delta.abs().max().clamp_min(1e-12)
        row.update(
            topk_overlap=_overlap(result["neighbours_clean"][i : i + 1],
                                  result["neighbours_adversarial"][i : i + 1]).item(),
            perturbation_norm=result["perturbation_norm"][i].item(),
            perturbation_linf=delta.abs().max().item(),
            amplification=(0.5 / scale).item(),
            adversarial_png=png_base64(result["adversarial"][i]),
            perturbation_png=png_base64(0.5 + delta * (0.5 / scale)),
        )
        details.append(row)
    return details


def retrieval_audit(
    encoder: nn.Module,
    queries: torch.Tensor,
    gallery_embeddings: torch.Tensor | np.ndarray,
    threat: ThreatModel,
    k: int = 10,
    steps: int = 20,
    targets: torch.Tensor | None = None,
    progress: Progress | None = None,
    attack: str = "apgd",
    details: int = 0,
) -> dict:
    """How far a budget-bounded attack moves the queries' top-k neighbours in the gallery.

    Returns the mean top-k overlap between clean and attacked neighbour sets (1 = unchanged),
    the fraction of queries whose top-1 neighbour changed, the same for a random perturbation
    of the same size, and the settings; with `details`, what happened to the first `details`
    queries (`query_details`). Puts the encoder in eval mode. attack "square": black-box,
    `steps` queries per image.
    """
    result = attack_retrieval(
        encoder, queries, gallery_embeddings, threat, k, steps, targets, progress=progress,
        attack=attack,
    )
    report = {**_settings(len(queries), threat, k, steps, targets is not None, attack),
              **summarize(result)}
    if details:
        report["examples"] = query_details(queries, result, torch.as_tensor(gallery_embeddings),
                                          details)
    return report


def _settings(num_queries: int, threat: ThreatModel, k: int, steps: int, toward: bool,
              attack: str = "apgd") -> dict:
    budget = {"steps": steps} if attack == "apgd" else {"queries": steps}
    return {"num_queries": num_queries, "k": k, **budget, "norm": threat.norm,
            "eps": threat.eps, "mode": "toward" if toward else "away", "attack": attack}


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
    from byorl.training.figures import plot_neighbours  # matplotlib: not for the worker's audits

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
