"""Linear heads on frozen encoders, trained clean or adversarially (paper section 4.1, appendix A).

Protocol: Adam, 50 epochs, lr 2e-3 divided by 10 after half of them, early stopping on the
1024 validation images (robust accuracy for robust heads). With few labels an epoch is only a
handful of optimiser steps (500 labels at batch 128 = 4 steps), and 50 such epochs underfit, so
each of the 50 epochs repeats the labeled set until the run totals at least `min_steps` steps:
the schedule and the early-stopping grid stay the paper's, only the step count grows.
`steps_per_epoch` instead fixes the batches per epoch (drawn from a stream of shuffled passes):
robust heads on all labels cost a PGD attack per batch, which a CPU cannot afford for 50 passes.

`l2` adds (l2 / 2) ||W||^2 on the standardised weights (logistic regression with an L2 penalty).
With few labels it decides much of the robustness: a head that fits the features tightly leans
on directions the attack can move. `select_l2_head` picks it on the held-out images.

The head sees features standardised with the labeled set's clean statistics, folded into W and
b at the end: Adam's fixed step then means the same for any encoder's feature scale (a random
encoder's features are ~0.01 and barely move under lr 2e-3), and the result is still W e(x) + b.
"""

import copy
import math
from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import PGD
from byorl.training.config import Config, Norm
from byorl.training.data import ImageSet

# progress(done, total, what): called after every unit of work (an epoch here).
Progress = Callable[[int, int, str], None]


class HeadConfig(Config):
    robust: bool = False  # adversarial training of the head through the frozen encoder
    norm: Norm = "linf"
    eps: float = Field(8 / 255, ge=0, allow_inf_nan=False)
    attack_steps: int = Field(10, ge=1)  # PGD steps of the training (and robust validation) attack
    epochs: int = Field(50, ge=1)
    lr: float = 2e-3
    decay_epoch: int = 25  # lr / 10 from this epoch on
    batch_size: int = Field(128, ge=1)
    # repeat the labeled set within each epoch until the run has this many
    min_steps: int = Field(2000, ge=0)
    # > 0: fixed batches per epoch from a shuffled stream (CPU budgets)
    steps_per_epoch: int = Field(0, ge=0)
    l2: float = Field(0.0, ge=0)  # (l2 / 2) ||W||^2 on the standardised weights
    seed: int = 0


class Classifier(nn.Module):
    """Encoder + linear head: pixels in [0, 1] -> logits, an ordinary classifier to attack."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class StandardizedLinear(nn.Module):
    """Linear layer on standardised inputs; `fold()` returns the equivalent plain nn.Linear."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear((f - self.mean) / self.std)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        w = self.linear.weight / self.std
        out = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        out.weight.copy_(w)
        out.bias.copy_(self.linear.bias - w @ self.mean)
        return out


def linear_from(weight, bias) -> nn.Linear:
    """An nn.Linear holding the given W (classes x features) and b (lists or arrays)."""
    w, b = torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head


def linear_to_lists(head: nn.Linear) -> dict:
    """W and b as lists (float32 values are exact in JSON): a saved head can be re-attacked
    later, by this project or another tool, with `linear_from(**d)`."""
    return {"weight": head.weight.detach().cpu().tolist(),
            "bias": head.bias.detach().cpu().tolist()}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float input is taken to be in [0, 1] already."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Frozen features of uint8 or [0, 1] images, encoder in eval mode, no augmentation."""
    encoder.eval()
    dev = _device(encoder)
    return torch.cat(
        [encoder(to_float(b).to(dev)).float().cpu() for b in images.split(batch_size)]
    )


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled passes over range(n) in batches (a pass's last batch may be short)."""
    while True:
        yield from torch.randperm(n, generator=gen).split(batch_size)


def _pgd(model: nn.Module, config: HeadConfig) -> PGD:
    def loss_fn(x_adv, y):
        return F.cross_entropy(model(x_adv), y, reduction="none")

    return PGD(loss_fn, config.norm, config.eps, config.attack_steps)


def _accuracy(model: nn.Module, data: ImageSet, config: HeadConfig) -> float:
    """Accuracy of the classifier, under the training attack when the head is robust."""
    dev, correct = _device(model), 0
    for idx in torch.arange(len(data)).split(config.batch_size):
        x, y = to_float(data.images[idx]).to(dev), data.labels[idx].to(dev)
        if config.robust:
            x = _pgd(model, config).perturb(x, y)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(data)


def _steps_per_epoch(n: int, config: HeadConfig) -> int:
    """config.steps_per_epoch, else whole passes over the `n` labeled images, as many as the
    run needs to total `min_steps`."""
    batches_per_pass = math.ceil(n / config.batch_size)
    passes = max(1, math.ceil(config.min_steps / (config.epochs * batches_per_pass)))
    return config.steps_per_epoch or passes * batches_per_pass


def _head_epoch(model: Classifier, feats: torch.Tensor, train: ImageSet, batches, steps: int,
                opt: torch.optim.Optimizer, config: HeadConfig) -> tuple[float, float]:
    """`steps` Adam steps of the head on the frozen features (robust heads: of PGD images);
    the mean loss and accuracy on the batches trained on."""
    encoder, head, dev = model.encoder, model.head, _device(model.head)
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(steps):
        idx = next(batches)
        y = train.labels[idx].to(dev)
        if config.robust:
            x = _pgd(model, config).perturb(to_float(train.images[idx]).to(dev), y)
            with torch.no_grad():
                f = encoder(x)
        else:
            f = feats[idx].to(dev)
        logits = head(f)
        loss = F.cross_entropy(logits, y) + config.l2 / 2 * head.linear.weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
    return loss_sum / seen, correct / seen


def _val_accuracy(model: Classifier, val: ImageSet, val_feats: torch.Tensor | None,
                  config: HeadConfig) -> float:
    """Early stopping's metric: robust accuracy for robust heads, else clean accuracy on the
    features computed once."""
    if config.robust:
        return _accuracy(model, val, config)
    with torch.no_grad():
        preds = model.head(val_feats.to(_device(model.head))).argmax(1).cpu()
    return (preds == val.labels).float().mean().item()


def fit_linear_head(
    encoder: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    num_classes: int,
    config: HeadConfig | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Linear, dict]:
    """Fit W e(x) + b on the frozen encoder; return the head of the best validation epoch.

    history: per-epoch train_loss and train_acc (on the batches trained on, adversarial for
    robust heads), val_acc, lr; best_epoch, best_val_acc, steps_per_epoch, optimizer_steps.

    Non-robust heads train on features computed once. Robust heads attack the input pixels with
    PGD on the cross-entropy through the frozen encoder (eval mode) at every batch. Ties in
    validation accuracy keep the earlier epoch; without a validation set the last epoch is kept.
    """
    # The frozen features, the head on their standardised values, Adam, the batch stream
    config = config or HeadConfig()
    encoder.eval()
    gen = torch.Generator().manual_seed(config.seed)
    feats = encode(encoder, train.images, config.batch_size)
    val_feats = None if config.robust or val is None else encode(encoder, val.images)
    torch.manual_seed(config.seed)
    head = StandardizedLinear(feats.mean(0), feats.std(0).clamp_min(1e-6), num_classes).to(
        _device(encoder))
    model = Classifier(encoder, head).eval()
    opt = torch.optim.Adam(head.parameters(), lr=config.lr)
    steps_per_epoch = _steps_per_epoch(len(train), config)
    batches = shuffled_batches(len(train), config.batch_size, gen)

    # The paper's epochs (lr / 10 from decay_epoch), keeping the best validation epoch's head
    history = {"train_loss": [], "train_acc": [], "val_acc": [], "lr": []}
    best_acc, best_state, best_epoch = -1.0, None, None
    for epoch in range(config.epochs):
        lr = config.lr * (0.1 if epoch >= config.decay_epoch else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, train_acc = _head_epoch(model, feats, train, batches, steps_per_epoch, opt, config)
        history["train_loss"].append(loss)
        history["train_acc"].append(train_acc)
        history["lr"].append(lr)
        if val is not None:
            history["val_acc"].append(acc := _val_accuracy(model, val, val_feats, config))
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy(head.state_dict())
        if progress is not None:
            progress(epoch + 1, config.epochs, "head epochs")

    if best_state is not None:
        head.load_state_dict(best_state)
    history.update(
        best_epoch=best_epoch if val is not None else config.epochs - 1,
        best_val_acc=best_acc if val is not None else None,
        steps_per_epoch=steps_per_epoch,
        optimizer_steps=config.epochs * steps_per_epoch,
        val_metric="robust accuracy (PGD)" if config.robust else "clean accuracy",
    )
    return head.fold(), history


# The L2 strengths `select_l2_head` tries: from none to one that dominates the data term.
L2_GRID = (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3)


def select_l2_head(
    encoder: nn.Module,
    train: ImageSet,
    val: ImageSet,
    num_classes: int,
    config: HeadConfig | None = None,
    grid: tuple[float, ...] = L2_GRID,
    progress: Progress | None = None,
) -> tuple[nn.Linear, dict]:
    """A non-robust head whose L2 strength is chosen on the held-out images, never the test set.

    Each strength in `grid` gets a head fitted like `fit_linear_head` (early stopping on clean
    validation accuracy); the kept one maximises clean + PGD robust accuracy on `val` (PGD with
    `config.attack_steps` steps through the frozen encoder): the accuracy on a stream of images
    half of which an adversary attacks. history: the chosen head's, plus `l2` and `l2_grid`
    (per strength: val_clean, val_robust).
    """
    config = (config or HeadConfig()).updated(robust=False)
    if len(val) == 0 or not grid:
        raise ValueError("choosing the L2 strength needs validation images and a grid")
    attacked = config.updated(robust=True)
    best, table = None, []
    for i, l2 in enumerate(grid):
        head, history = fit_linear_head(encoder, train, val, num_classes, config.updated(l2=l2))
        model = Classifier(encoder, head).eval()
        row = {"l2": l2, "val_clean": _accuracy(model, val, config),
               "val_robust": _accuracy(model, val, attacked)}
        table.append(row)
        if best is None or row["val_clean"] + row["val_robust"] > best[0]:
            best = (row["val_clean"] + row["val_robust"], head, history, l2)
        if progress is not None:
            progress(i + 1, len(grid), "head l2 grid")
    _, head, history, l2 = best
    history.update(l2=l2, l2_grid=table, selection="max val clean + PGD robust accuracy")
    return head, history


# nonrobust: the paper's protocol; l2: non-robust, its L2 strength chosen on held-out images;
# robust: adversarial training of the head through the frozen encoder.
HEAD_KINDS = ("nonrobust", "l2", "robust")


def fit_head(
    kind: str,
    encoder: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    num_classes: int,
    config: HeadConfig | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Linear, dict]:
    """The head of one of HEAD_KINDS, from `config` with `robust` set by the kind."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
    config = (config or HeadConfig()).updated(robust=kind == "robust")
    if kind == "l2":
        return select_l2_head(encoder, train, val, num_classes, config, progress=progress)
    return fit_linear_head(encoder, train, val, num_classes, config, progress)
