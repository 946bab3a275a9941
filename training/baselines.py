"""The paper's baselines, with the same encoders, data and label subsets as BYORL.

- Adversarial training (Madry et al. 2018): encoder + linear layer trained end to end on the
  labeled subset, on PGD examples of the cross-entropy.
- UAT-FT (Uesato et al. 2019): a non-robust classifier of the same architecture, trained on the
  labeled subset, pseudo-labels the other training images; adversarial training then runs on
  all of them. With every label available it is plain adversarial training.

Both stop early (Rice et al. 2020): the weights kept are those of the best validation check,
robust accuracy under PGD for adversarial training, clean accuracy for the pseudo-labeler.
The recipe is the usual one for CIFAR adversarial training: SGD with momentum 0.9, weight decay
5e-4, batch 128, learning rate 0.1 divided by 10 at 50 % and 75 % of the steps, PGD-10.
Budgets are counted in optimiser steps, as with few labels an epoch is only a few steps.
"""

import copy
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import PGD, ThreatModel
from byorl.training.augment import random_resized_crop_flip
from byorl.training.batchnorm import frozen_bn_stats
from byorl.training.checkpoint import save_atomic
from byorl.training.config import Config
from byorl.training.data import ImageSet
from byorl.training.device import pick_device
from byorl.training.linear_classifier import Classifier, Progress, to_float
from byorl.training.models import create_model


class BaselineConfig(Config):
    arch: str = "preact_resnet34"
    width: int = 2
    steps: int = Field(20_000, ge=1)  # optimiser steps of the adversarially trained model
    teacher_steps: int = Field(5_000, ge=1)  # optimiser steps of UAT-FT's non-robust pseudo-labeler
    batch_size: int = Field(128, ge=1)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # PGD steps of the training attack (step size 2.5 eps / steps)
    attack_steps: int = Field(10, ge=1)
    eval_every: int = Field(500, ge=1)  # optimiser steps between early-stopping checks
    eval_attack_steps: int = Field(20, ge=1)  # PGD steps of the validation attack
    min_crop: float = 0.64  # crop + flip augmentation: smallest area fraction kept
    device: str = "auto"
    seed: int = 0


def new_classifier(arch: str, width: int, num_classes: int) -> Classifier:
    encoder = create_model(arch, width=width)
    return Classifier(encoder, nn.Linear(encoder.num_features, num_classes))


def _pgd(model: nn.Module, threat: ThreatModel, steps: int) -> PGD:
    def loss_fn(x_adv, y):
        return F.cross_entropy(model(x_adv), y, reduction="none")

    return PGD(loss_fn, threat.norm, threat.eps, steps)


def accuracy(
    model: nn.Module,
    data: ImageSet,
    threat: ThreatModel | None = None,
    attack_steps: int = 20,
    batch_size: int = 256,
) -> float:
    """Accuracy in eval mode, under PGD on the cross-entropy when a threat model is given."""
    model.eval()
    dev, correct = next(model.parameters()).device, 0
    for xb, yb in zip(data.images.split(batch_size), data.labels.split(batch_size), strict=True):
        x, y = to_float(xb).to(dev), yb.to(dev)
        if threat is not None:
            x = _pgd(model, threat, attack_steps).perturb(x, y)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(data)


def _lr(step: int, total: int, base: float) -> float:
    return base * (0.1 ** ((step >= total // 2) + (step >= 3 * total // 4)))


def _next_batch(run: dict, n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """The next batch of a fresh permutation per pass over the set (the rest of the pass stays
    in run["order"], which a checkpoint keeps)."""
    order = run["order"]
    if len(order) < batch_size:
        order = torch.cat([order, torch.randperm(n, generator=gen)])
    run["order"] = order[batch_size:]
    return order[:batch_size]


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              threat: ThreatModel | None, config: BaselineConfig, lr: float) -> tuple:
    """One training step at `lr`: on PGD examples (made with BatchNorm statistics frozen) when
    there is a threat model; returns the loss and the logits."""
    model.train()
    if threat is not None:
        with frozen_bn_stats(model):
            x = _pgd(model, threat, config.attack_steps).perturb(x, y)
    for g in opt.param_groups:
        g["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


def _early_stopping_check(model: nn.Module, run: dict, step: int, val: ImageSet | None,
                          threat: ThreatModel | None, config: BaselineConfig) -> None:
    """Record the training loss and accuracy since the last check and the validation accuracy;
    keep the weights when they are the best so far."""
    history = run["history"]
    history["step"].append(step)
    history["train_loss"].append(run["loss_sum"] / run["seen"])
    history["train_acc"].append(run["correct"] / run["seen"])
    run["loss_sum"] = run["correct"] = run["seen"] = 0.0
    if val is not None:
        acc = accuracy(model, val, threat, config.eval_attack_steps)
        history["val_acc"].append(acc)
        if acc > run["best_acc"]:
            run["best_acc"], run["best_step"] = acc, step
            run["best_state"] = copy.deepcopy(model.state_dict())


def train_classifier(
    train: ImageSet,
    val: ImageSet | None,
    num_classes: int,
    config: BaselineConfig,
    threat: ThreatModel | None = None,
    steps: int | None = None,
    progress: Progress | None = None,
    state: Path | None = None,
    checkpoint_every: int = 100,
) -> tuple[Classifier, dict]:
    """Train encoder + linear layer end to end, adversarially within `threat` (Madry) or, with
    no threat model, on clean images; keep the weights of the best validation check (the last
    ones when there is no validation set).

    Args:
        state: a checkpoint file, written every `checkpoint_every` steps and at the end: a run
            given the file of an interrupted one goes on from it to the same weights (an
            adversarial training takes up to an hour on a CPU; a finished file is just loaded).
    """
    # The model, SGD, the batch order, and the state of an interrupted run
    steps = steps or config.steps
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model = new_classifier(config.arch, config.width, num_classes).to(
        device, memory_format=torch.channels_last)  # as train.py: faster passes on CPU and GPU
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = train.images.to(device), train.labels.to(device)
    run = {"step": 0, "order": torch.empty(0, dtype=torch.long), "loss_sum": 0.0,
           "correct": 0.0, "seen": 0.0, "best_acc": -1.0, "best_step": None, "best_state": None,
           "history": {"step": [], "train_loss": [], "train_acc": [], "val_acc": []}}
    if state is not None and state.is_file():
        run = _load_run(state, model, opt, gen, device)

    # Steps on augmented (and attacked) batches; early-stopping checks; checkpoints
    for step in range(run["step"], steps):
        idx = _next_batch(run, len(train), config.batch_size, gen).to(device)
        x = random_resized_crop_flip(to_float(images[idx]), (config.min_crop, 1.0))
        y = labels[idx]
        loss, logits = _sgd_step(model, opt, x, y, threat, config, _lr(step, steps, config.lr))
        run["loss_sum"] += loss.item() * len(y)
        run["correct"] += (logits.argmax(1) == y).sum().item()
        run["seen"] += len(y)
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            _early_stopping_check(model, run, step + 1, val, threat, config)
            if progress is not None:
                progress(step + 1, steps, "training" if threat is None else "adversarial training")
        if state is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save_run(state, model, opt, gen, device, {
                **run, "step": step + 1,
                # the best weights, unless they are the current ones (half the file's size)
                "best_state": run["best_state"] if run["best_step"] != step + 1 else None})

    # The best check's weights
    if run["best_state"] is not None:
        model.load_state_dict(run["best_state"])
    history = run["history"]
    history.update(
        best_step=run["best_step"] if val is not None else steps,
        best_val_acc=run["best_acc"] if val is not None else None,
        val_metric="clean accuracy" if threat is None else "robust accuracy (PGD)",
    )
    return model.eval(), history


def _save_run(path: Path, model, opt, gen, device, run: dict) -> None:
    rng = {"cpu": torch.get_rng_state(), "generator": gen.get_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    save_atomic({**run, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng},
                path)


def _load_run(path: Path, model, opt, gen, device) -> dict:
    """Restore model, optimiser and random states from `_save_run`'s file; returns the loop's
    variables (the best weights filled in when they were the saved step's own)."""
    run = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(run.pop("model"))
    opt.load_state_dict(run.pop("optimizer"))
    rng = run.pop("rng")
    torch.set_rng_state(rng["cpu"].cpu())
    gen.set_state(rng["generator"].cpu())
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    run["order"] = run["order"].cpu()
    if run["best_step"] == run["step"]:
        run["best_state"] = copy.deepcopy(model.state_dict())
    return run


@torch.no_grad()
def pseudo_label(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's predicted class of each image (eval mode, no augmentation)."""
    model.eval()
    dev = next(model.parameters()).device
    preds = [model(to_float(b).to(dev)).argmax(1).cpu() for b in images.split(batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def uat_ft(
    labeled: ImageSet,
    unlabeled: torch.Tensor,
    val: ImageSet | None,
    num_classes: int,
    threat: ThreatModel,
    config: BaselineConfig,
    progress: Progress | None = None,
    checkpoints: Path | None = None,
) -> tuple[Classifier, dict]:
    """UAT-FT: pseudo-label the unlabeled images (uint8) with a non-robust classifier trained on
    the labeled set, then adversarially train on labeled + pseudo-labeled images.

    The history holds the teacher's and the student's runs and the pseudo-labels themselves.

    Args:
        checkpoints: a folder for the two trainings' checkpoints (`train_classifier`'s state):
            `teacher.pt`, `student.pt`; an interrupted run given it goes on from them.
    """
    def state(name: str) -> Path | None:
        return checkpoints / f"{name}.pt" if checkpoints is not None else None

    history: dict = {"teacher": None, "pseudo_labels": torch.empty(0, dtype=torch.long)}
    data = labeled
    if len(unlabeled):
        teacher, history["teacher"] = train_classifier(
            labeled, val, num_classes, config, steps=config.teacher_steps, progress=progress,
            state=state("teacher"))
        history["pseudo_labels"] = pseudo_label(teacher, unlabeled)
        data = ImageSet(torch.cat([labeled.images, unlabeled]),
                        torch.cat([labeled.labels, history["pseudo_labels"]]), labeled.classes)
    model, history["student"] = train_classifier(data, val, num_classes, config, threat,
                                                 progress=progress, state=state("student"))
    return model, history

