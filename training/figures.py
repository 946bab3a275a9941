"""Figures: accuracy against the fraction of labels (Fig. 3/4, 7/8), loss landscapes (Fig. 9/10),
and neighbour grids (Fig. 1). Plotting is matplotlib with the Agg backend, so it runs headless.

The loss landscape is the gradient-masking check of the paper's appendix D: the margin loss
z_y - max_{i != y} z_i over the plane spanned by the perturbation PGD found (u) and a random
Rademacher direction (v). A smooth surface that falls below zero only far from the image speaks
for real robustness; a jagged one for masked gradients.
"""

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

from byorl.training.attacks import PGD, ThreatModel, margin_loss
from byorl.training.checkpoint import load_encoder
from byorl.training.data import label_subset, load_images
from byorl.training.linear_classifier import Classifier, HeadConfig, fit_linear_head, to_float
from byorl.training.reports import threat_label

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

METHOD_STYLE = {
    "byorl": ("BYORL", "tab:red"),
    "byol": ("BYOL", "tab:gray"),
    "at": ("AT (labeled only)", "tab:green"),
    "uat_ft": ("UAT-FT", "tab:blue"),
}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HEAD_STYLE = {"": "o-", "robust": "o-", "nonrobust": "s--", "l2": "^:"}


def plot_accuracy(rows: list[dict], metric: str, path: str | Path, title: str = "") -> Path:
    """Accuracy (`metric`, in [0, 1]) against the fraction of labels, one line per method and
    head kind (colour: method; line style: head).

    Rows need `method`, `label_fraction` and the metric (and `head`, "" for baselines); pass the
    rows of one threat model.
    """
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][4:] * 4)
    styles = dict(METHOD_STYLE)  # methods beyond the paper's (named encoders) get a colour each
    lines = dict.fromkeys((r["method"], r.get("head", "")) for r in rows)
    for method, head in lines:
        pts = sorted((r["label_fraction"], r[metric]) for r in rows
                     if (r["method"], r.get("head", "")) == (method, head))
        name, color = styles.setdefault(method, (method, next(colours)))
        label = f"{name}, {head} head" if head else name
        xs, ys = zip(*pts, strict=True)
        ax.plot([100 * x for x in xs], [100 * y for y in ys], HEAD_STYLE.get(head, "o-"),
                label=label, color=color)
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.set_xlabel("labels available (% of the training set)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    return t.abs().max() if norm == "linf" else t.norm()


@torch.no_grad()
def _margins(model: nn.Module, x: torch.Tensor, y: int, deltas: torch.Tensor) -> np.ndarray:
    """Margin of model at clip(x + delta) for each delta, in batches."""
    out = []
    for chunk in deltas.split(256):
        logits = model((x + chunk).clamp(0, 1))
        out.append(-margin_loss(logits, torch.full((len(chunk),), y, dtype=torch.long)))
    return torch.cat(out).numpy()


def loss_landscape(
    model: nn.Module,
    x: torch.Tensor,
    y: int,
    threat: ThreatModel,
    resolution: int = 21,
    span: float = 2.0,
    steps: int = 20,
    seed: int = 0,
) -> dict:
    """Margin loss of one image x (3, H, W) over the plane x + a u + b v, |a|, |b| <= span * eps.

    u is the PGD perturbation (on the margin loss) and v a Rademacher direction, both scaled to
    unit norm (for l2, v is first made orthogonal to u), so a and b are perturbation sizes.
    The eps-ball's trace on the plane is exact: its boundary in direction (cos t, sin t) lies at
    eps / ||cos t u + sin t v||. Inputs are clipped to [0, 1] as every attack clips them.
    """
    model.eval()
    x = x.unsqueeze(0)
    label = torch.tensor([y])
    pgd = PGD(lambda xa, ya: margin_loss(model(xa), ya), threat.norm, threat.eps, steps)
    delta = (pgd.perturb(x, label) - x)[0]
    if _norm(delta, threat.norm) == 0:
        raise ValueError("PGD moved nowhere: zero input gradients, a sign of gradient masking")
    u = delta / _norm(delta, threat.norm)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 2, u.shape, generator=gen).float() * 2 - 1
    if threat.norm == "l2":
        v = v - (v * u).sum() * u
    v = v / _norm(v, threat.norm)
    coords = torch.linspace(-span * threat.eps, span * threat.eps, resolution)
    b, a = torch.meshgrid(coords, coords, indexing="ij")
    grid = a.reshape(-1, 1, 1, 1) * u + b.reshape(-1, 1, 1, 1) * v
    angles = torch.linspace(0, 2 * math.pi, 181)
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    radius = threat.eps / torch.stack([_norm(c * u + s * v, threat.norm) for c, s in dirs])
    ball = dirs * radius[:, None]
    ball_deltas = ball[:, 0].reshape(-1, 1, 1, 1) * u + ball[:, 1].reshape(-1, 1, 1, 1) * v
    return {
        "u": coords.numpy(),
        "v": coords.numpy(),
        "u_direction": u.numpy(),
        "v_direction": v.numpy(),
        "margin": _margins(model, x, y, grid).reshape(resolution, resolution),
        "ball": ball.numpy(),
        "ball_margin": _margins(model, x, y, ball_deltas),
        "clean_margin": float(_margins(model, x, y, torch.zeros_like(x))[0]),
        "pgd_margin": float(_margins(model, x, y, delta[None])[0]),
        "label": y,
        "norm": threat.norm,
        "eps": threat.eps,
    }


def plot_landscapes(
    landscapes: list[dict], path: str | Path, classes: list[str] | None = None
) -> Path:
    """Fig. 9/10: one 3-D margin surface per image, the eps-ball traced on it in black."""
    n = len(landscapes)
    fig = plt.figure(figsize=(3.6 * n, 3.6))
    for i, land in enumerate(landscapes):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        a, b = np.meshgrid(land["u"], land["v"])
        ax.plot_surface(a, b, land["margin"], cmap="viridis", alpha=0.85, linewidth=0)
        ball = land["ball"]
        ax.plot(ball[:, 0], ball[:, 1], land["ball_margin"], color="black", linewidth=2)
        name = classes[land["label"]] if classes else str(land["label"])
        ax.set_title(f"{name}: margin {land['clean_margin']:.2f} -> {land['pgd_margin']:.2f}",
                     fontsize=8)
        ax.set_xlabel("u (PGD)", fontsize=7)
        ax.set_ylabel("v (Rademacher)", fontsize=7)
        ax.set_zlabel("margin", fontsize=7)
        ax.tick_params(labelsize=6)
    if landscapes:
        fig.suptitle(f"margin loss, {threat_label(landscapes[0]['norm'], landscapes[0]['eps'])}",
                     fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def model_landscapes(
    checkpoint: str | Path,
    data: str,
    out: str | Path,
    threat: ThreatModel,
    labels: float = 500,
    head: HeadConfig | None = None,
    num_images: int = 4,
    resolution: int = 21,
    steps: int = 20,
    val_size: int = 1024,
    seed: int = 0,
) -> list[dict]:
    """Fig. 9/10 for an encoder: fit a linear head (robust by default) on `labels` labeled
    images, then draw the landscapes of `num_images` random test images to `out`. Images are
    read at the size the encoder was trained on."""
    encoder, config = load_encoder(checkpoint)
    size = config["data"]["image_size"]
    train, test = (load_images(data, split, size) for split in ("train", "test"))
    labeled, val = label_subset(len(train), labels, seed, val_size)
    head = head or HeadConfig(robust=True)
    head = head.updated(norm=threat.norm, eps=threat.eps)
    linear, _ = fit_linear_head(encoder, train.subset(labeled), train.subset(val),
                                len(train.classes), head)
    model = Classifier(encoder, linear).eval()
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:num_images]
    lands = [loss_landscape(model, to_float(test.images[i]), int(test.labels[i]), threat,
                            resolution, steps=steps, seed=seed + n) for n, i in enumerate(pick)]
    plot_landscapes(lands, out, test.classes)
    return lands


def plot_neighbours(
    rows: list[tuple[str, torch.Tensor, list[int]]],
    gallery_images: torch.Tensor,
    gallery_labels: torch.Tensor,
    classes: list[str],
    query_label: int,
    path: str | Path,
) -> Path:
    """Fig. 1: per row, a query image (float [0, 1]) then its neighbours (gallery indices,
    uint8 or float images), each titled by class, in red when not the query's class."""
    k = max(len(idx) for _, _, idx in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.05 * (k + 1), 1.35 * len(rows)),
                             squeeze=False)
    for ax_row, (title, query, idx) in zip(axes, rows, strict=True):
        for ax in ax_row:
            ax.axis("off")
        ax_row[0].imshow(query.permute(1, 2, 0).clamp(0, 1).numpy())
        ax_row[0].set_title(title, fontsize=7)
        for ax, j in zip(ax_row[1:], idx, strict=False):
            image = gallery_images[j]
            image = image.float() / 255 if image.dtype == torch.uint8 else image
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            cls = int(gallery_labels[j])
            ax.set_title(classes[cls], fontsize=7, color="black" if cls == query_label else "red")
    fig.tight_layout()
    return _save(fig, path)
