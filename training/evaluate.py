"""Robust accuracy under the paper's attack suite, with the sanity checks that make it credible.

The suite (paper section 4.1 and appendix A) is a per-example worst case over AutoPGD on the
cross-entropy, AutoPGD on the difference-of-logits-ratio loss, MultiTargeted on the margin loss
and the black-box Square attack, each attack run only on the points all previous ones failed on.
torchattacks provides APGD and Square; MultiTargeted (Gowal et al. 2019) is in no library and
lives with the project's other attacks (attacks.py). Every result names the mode and the exact
attack settings that produced it.
"""

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchattacks
from pydantic import ConfigDict
from torch import nn
from torch.nn import functional as F

from byorl.files import atomic_write
from byorl.training.attacks import MultiTargeted, ThreatModel
from byorl.training.checkpoint import load_encoder
from byorl.training.config import Config, EvalMode
from byorl.training.data import VAL_SIZE, label_subset, load_images
from byorl.training.device import pick_device
from byorl.training.linear_classifier import (
    HEAD_KINDS,
    Classifier,
    HeadConfig,
    Progress,
    fit_head,
    linear_to_lists,
    to_float,
)
from byorl.training.reports import report_markdown

# attack(model, x, y, norm, eps) -> x_adv inside the eps-ball around x and inside [0, 1].
AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, str, float], torch.Tensor]


class SuiteSettings(Config):
    model_config = ConfigDict(frozen=True)

    apgd_restarts: int
    apgd_steps: int
    mt_restarts: int
    mt_steps: int
    square_queries: int
    sanity_steps: int  # APGD-CE steps of the eps-ladder sanity checks


SUITES: dict[EvalMode, SuiteSettings] = {
    "full": SuiteSettings(apgd_restarts=5, apgd_steps=100, mt_restarts=20, mt_steps=200,
                          square_queries=5000, sanity_steps=20),  # the paper's
    "quick": SuiteSettings(apgd_restarts=1, apgd_steps=20, mt_restarts=3, mt_steps=20,
                           square_queries=300, sanity_steps=10),  # CPU, tests: never the paper's
}
LADDER = (0.0, 0.5, 1.0, 2.0)  # multiples of eps for the monotonicity check
LARGE_EPS_PIXEL = 0.5  # linf radius that reaches mid-grey from any image; l2 uses 0.5 * sqrt(d)
NEAR_ZERO = 0.05  # robust accuracy at the large eps must not exceed this
SQUARE_TOLERANCE = 0.01  # Square may fool at most this fraction more than the white-box attacks
BLACK_BOX_ATTACKS = ("square",)  # forward passes only: may query an equivalent fast module
BLACK_BOX_TOLERANCE = 0.005  # clean predictions a black_box may change (float rounding at ties)
ZERO_GRAD_TOLERANCE = 0.05  # fraction of correct points allowed an exactly-zero input gradient


_TA_NORM = {"linf": "Linf", "l2": "L2"}


def library_attack(cls, **kw) -> AttackFn:
    """A torchattacks attack; it reseeds the global RNG, so run it on a forked RNG state."""

    def run(model, x, y, norm, eps):
        with torch.random.fork_rng():
            return cls(model, norm=_TA_NORM[norm], eps=eps, **kw)(x, y)

    return run


def _multitargeted(steps: int, restarts: int) -> AttackFn:
    def run(model, x, y, norm, eps):
        return MultiTargeted(model, norm, eps, steps, restarts).perturb(x, y)

    return run


def suite(mode: str, num_classes: int) -> list[tuple[str, dict, AttackFn]]:
    """(name, settings, attack) in the order they run; APGD-DLR needs at least 3 classes."""
    if mode not in SUITES:
        raise ValueError(f"mode must be one of {sorted(SUITES)}, got {mode!r}")
    s = SUITES[mode]
    apgd = {"restarts": s.apgd_restarts, "steps": s.apgd_steps, "library": "torchattacks"}
    attacks = [
        ("apgd-ce", {**apgd, "loss": "ce"},
         library_attack(torchattacks.APGD, steps=s.apgd_steps, n_restarts=s.apgd_restarts,
                        loss="ce")),
    ]
    if num_classes >= 3:
        attacks.append((
            "apgd-dlr", {**apgd, "loss": "dlr"},
            library_attack(torchattacks.APGD, steps=s.apgd_steps, n_restarts=s.apgd_restarts,
                           loss="dlr"),
        ))
    attacks += [
        ("multitargeted",
         {"restarts": s.mt_restarts, "steps": s.mt_steps, "loss": "margin", "library": "byorl"},
         _multitargeted(s.mt_steps, s.mt_restarts)),
        ("square", {"queries": s.square_queries, "restarts": 1, "library": "torchattacks"},
         library_attack(torchattacks.Square, n_queries=s.square_queries, n_restarts=1)),
    ]
    return attacks


def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes of `x` in batches (bounded memory), without gradients, on CPU."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(b.to(dev)).argmax(1).cpu() for b in x.split(batch_size)])


def _check_budget(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    """An attack that leaves the threat model would inflate its success: fail loudly instead."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if size.max() > eps * (1 + 1e-4) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"attack left the {norm} ball of radius {eps}: {size.max():.6f}")


def attack_robust(model, attack: AttackFn, x, y, robust, norm, eps, batch_size, todo=None,
                  after_batch=None, queried=None) -> int:
    """Attack the points `todo` (default: the still-robust ones) in batches; mark those fooled
    (by `model`'s answer); return how many. The attack queries `queried` (default: `model`).
    `after_batch(batch, fooled)` follows each batch, e.g. to save progress."""
    dev = next(model.parameters()).device
    idx = robust.nonzero().squeeze(1) if todo is None else todo
    fooled = 0
    for b in idx.split(batch_size) if len(idx) else ():  # split() of nothing gives one empty part
        xb, yb = x[b].to(dev), y[b].to(dev)
        x_adv = attack(model if queried is None else queried, xb, yb, norm, eps).detach()
        _check_budget(x_adv, xb, norm, eps)
        with torch.no_grad():
            hit = (model(x_adv).argmax(1) != yb).cpu()
        robust[b[hit]] = False
        fooled += int(hit.sum())
        if after_batch is not None:
            after_batch(b, int(hit.sum()))
    return fooled


def _zero_gradient_fraction(model, x, y, correct, batch_size) -> float:
    """Fraction of correctly classified points whose cross-entropy input gradient is all zero."""
    dev = next(model.parameters()).device
    idx = correct.nonzero().squeeze(1)
    zeros = 0
    for b in idx.split(batch_size):
        xb = x[b].to(dev).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), y[b].to(dev), reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
        zeros += int((g.flatten(1).abs().amax(1) == 0).sum())
    return zeros / max(len(idx), 1)


def large_eps(norm: str, shape: torch.Size) -> float:
    return LARGE_EPS_PIXEL if norm == "linf" else LARGE_EPS_PIXEL * math.sqrt(math.prod(shape))


def evaluate_robustness(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: ThreatModel,
    mode: str = "full",
    batch_size: int = 256,
    progress: Progress | None = None,
    state: str | Path | None = None,
    black_box: nn.Module | None = None,
) -> dict:
    """Clean and robust accuracy of a classifier (pixels in [0, 1] -> logits) under the suite.

    `images` are uint8 or floats in [0, 1]. The model is evaluated in eval mode, its weights in
    the channels-last memory format (the same values; on this project's CPU the attacks'
    forward + backward passes run 1.2x faster, forwards 1.09x: bench/bench_attack_passes.py);
    mode and format are restored afterwards. The sanity checks always run and are reported
    under "checks".

    Args:
        batch_size: points per attacked batch; with `state`, also how often progress is saved.
        state: a JSON file that holds the run's progress, written after every attacked batch;
            a run given the file of an interrupted one goes on where it stopped (the full suite
            on a robust model takes hours on a CPU). It must come from the same model, points
            and suite: the clean predictions, the mode and the threat model are checked.
        black_box: the same classifier as a forward-only module (its encoder in ONNX Runtime:
            1.3x faster forwards on this CPU), which the black-box Square queries instead of
            `model`; `model` still decides which points are fooled. Refused when its clean
            predictions differ from `model`'s on more than 0.5 % of the images.
    """
    if len(labels) == 0 or len(images) != len(labels):
        raise ValueError(f"need one label per image, at least one: {len(images)}, {len(labels)}")
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    try:
        return _evaluate(model, to_float(images), labels.long().cpu(), threat, mode, batch_size,
                         progress, Path(state) if state is not None else None, black_box)
    finally:
        model.train(was_training).to(memory_format=torch.contiguous_format)


def _bits(mask: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def _mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def _suite_state(path: Path | None, mode: str, threat: ThreatModel, correct: torch.Tensor) -> dict:
    """The saved progress at `path` when it exists and fits this run, else a fresh one."""
    fresh = {"mode": mode, "threat_model": {"norm": threat.norm, "eps": threat.eps},
             "correct": _bits(correct), "robust": _bits(correct), "attacks": [], "current": None,
             "rungs": [], "seconds": 0.0}
    if path is None or not path.is_file():
        return fresh
    saved = json.loads(path.read_text())
    if any(saved.get(k) != fresh[k] for k in ("mode", "threat_model", "correct")):
        raise ValueError(f"{path} holds the progress of another model, test set, mode or threat "
                         "model; delete it to start over")
    return saved


class _SuiteRun:
    """The suite's progress (`state`, the still-robust points): saved to `path` after every
    attacked batch, counted on `progress`."""

    def __init__(self, state: dict, path: Path | None, progress: Progress | None, total: int,
                 start: float):
        self.st, self.robust, self.path = state, _mask(state["robust"]), path
        self.progress, self.total, self.start = progress, total, start
        self.before, self.done = state["seconds"], len(state["attacks"]) + len(state["rungs"])

    def seconds(self) -> float:
        """Time spent on the suite, over the runs that resumed it."""
        return self.before + time.perf_counter() - self.start

    def save(self) -> None:
        self.st["robust"], self.st["seconds"] = _bits(self.robust), self.seconds()
        if self.path is not None:
            atomic_write(self.path, [json.dumps(self.st).encode()])

    def step(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, what)


def _correct_predictions(model, x, y, batch_size, black_box) -> torch.Tensor:
    """Which points the model classifies correctly; refuses a `black_box` that is not the same
    classifier."""
    predicted = predict(model, x, batch_size)
    if black_box is not None:
        differ = (predict(black_box, x, batch_size) != predicted).float().mean().item()
        if differ > BLACK_BOX_TOLERANCE:
            raise ValueError(f"black_box disagrees with the model on {differ:.1%} of the images: "
                             "it is not the same classifier")
    return predicted == y


def _attack_survivors(model, name, settings, attack, x, y, threat, batch_size, run: _SuiteRun,
                      black_box) -> None:
    """One attack of the suite on the points every previous one failed on (from its last saved
    batch when resumed), and its record."""
    st = run.st
    cur = st["current"] or {"todo": run.robust.nonzero().squeeze(1).tolist(), "fooled": 0,
                            "seconds": 0.0}
    st["current"], t0, spent = cur, time.perf_counter(), cur["seconds"]

    def after_batch(b, fooled):
        cur["todo"], cur["fooled"] = cur["todo"][len(b):], cur["fooled"] + fooled
        cur["seconds"] = spent + time.perf_counter() - t0
        run.save()

    queried = black_box if name in BLACK_BOX_ATTACKS else None
    attack_robust(model, attack, x, y, run.robust, threat.norm, threat.eps, batch_size,
                  torch.tensor(cur["todo"], dtype=torch.long), after_batch, queried)
    if queried is not None:
        settings = {**settings, "queried": type(getattr(queried, "encoder", queried)).__name__}
    st["attacks"].append({
        "name": name, "settings": settings, "fooled": cur["fooled"],
        "robust_accuracy": run.robust.float().mean().item(),
        "seconds": round(spent + time.perf_counter() - t0, 3),
    })
    st["current"] = None
    run.save()
    run.step(name)


def _probe_ladder(model, x, y, correct, ladder, norm, steps, batch_size, run: _SuiteRun) -> None:
    """The sanity probe (APGD-CE) at each eps of the ladder not yet done, on all correct
    points."""
    probe = library_attack(torchattacks.APGD, steps=steps, n_restarts=1, loss="ce")
    for label, eps in ladder[len(run.st["rungs"]):]:
        still = correct.clone()
        attack_robust(model, probe, x, y, still, norm, eps, batch_size)
        run.st["rungs"].append({"eps": eps, "label": label,
                                "robust_accuracy": still.float().mean().item()})
        run.save()
        run.step(f"sanity {label}")


def _checks(clean_acc, robust_acc, records, rungs, zero_grad, n) -> dict:
    """The sanity checks that make the robust accuracy credible, each with its evidence."""
    tol = max(1, 0.005 * n) / n
    accs = [r["robust_accuracy"] for r in rungs]
    at_eps = accs[LADDER.index(1.0)]
    whitebox_acc = records[-2]["robust_accuracy"]
    return {
        "eps0_equals_clean": {"passed": accs[0] == clean_acc, "clean": clean_acc,
                              "eps0": accs[0]},
        "non_increasing_in_eps": {"passed": all(b <= a + tol for a, b in itertools.pairwise(accs)),
                                  "ladder": rungs, "tolerance": tol},
        "suite_at_least_as_strong_as_probe": {"passed": robust_acc <= at_eps + tol,
                                              "suite": robust_acc, "probe": at_eps},
        "large_eps_near_zero": {"passed": accs[-1] <= NEAR_ZERO, "eps": rungs[-1]["eps"],
                                "robust_accuracy": accs[-1], "threshold": NEAR_ZERO},
        "square_not_better_than_whitebox": {
            "passed": whitebox_acc - robust_acc <= SQUARE_TOLERANCE,
            "whitebox": whitebox_acc, "with_square": robust_acc, "threshold": SQUARE_TOLERANCE},
        "nonzero_gradients": {"passed": zero_grad <= ZERO_GRAD_TOLERANCE,
                              "zero_gradient_fraction": zero_grad,
                              "threshold": ZERO_GRAD_TOLERANCE},
    }


def _evaluate(model, x, y, threat, mode, batch_size, progress, path, black_box) -> dict:
    start, n = time.perf_counter(), len(y)
    # The suite for this many classes, and the sanity probe's eps ladder
    with torch.no_grad():
        num_classes = model(x[:1].to(next(model.parameters()).device)).shape[1]
    attacks, s = suite(mode, num_classes), SUITES[mode]
    ladder = [(f"{m:g} eps", m * threat.eps) for m in LADDER]
    ladder.append(("large eps", large_eps(threat.norm, x.shape[1:])))

    # Clean predictions, and the progress of an interrupted run on them
    correct = _correct_predictions(model, x, y, batch_size, black_box)
    run = _SuiteRun(_suite_state(path, mode, threat, correct), path, progress,
                    len(attacks) + len(ladder) + 1, start)

    # Each attack on the still-robust points (attacks finished before are kept)
    for name, settings, attack in attacks[len(run.st["attacks"]):]:
        _attack_survivors(model, name, settings, attack, x, y, threat, batch_size, run, black_box)
    clean_acc, robust_acc = correct.float().mean().item(), run.robust.float().mean().item()

    # Sanity checks: the probe over the eps ladder, then the input gradients
    _probe_ladder(model, x, y, correct, ladder, threat.norm, s.sanity_steps, batch_size, run)
    zero_grad = _zero_gradient_fraction(model, x, y, correct, batch_size)
    run.step("sanity gradients")
    checks = _checks(clean_acc, robust_acc, run.st["attacks"], run.st["rungs"], zero_grad, n)

    # The record: what was attacked, how, and what survived
    return {
        "mode": mode,
        "suite": s.model_dump(),
        "threat_model": {"norm": threat.norm, "eps": threat.eps},
        "n": n,
        "clean_accuracy": clean_acc,
        "robust_accuracy": robust_acc,
        # which test images (positions in the order given) survived every attack: another
        # tool's re-check of the same images combines with it per example
        "robust_indices": run.robust.nonzero().flatten().tolist(),
        "attacks": run.st["attacks"],
        "checks": checks,
        "checks_passed": all(c["passed"] for c in checks.values()),
        "sanity_probe": {"attack": "apgd-ce", "library": "torchattacks", "restarts": 1,
                         "steps": s.sanity_steps},
        "seconds": round(run.seconds(), 3),
    }


def evaluate_black_box(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: ThreatModel,
    mode: str = "full",
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict:
    """Clean accuracy and accuracy under the suite's Square alone, for a classifier whose
    gradients are not available (forward passes only). Square alone is weaker than the suite,
    so the robust accuracy is an upper bound (`upper_bound`); no sanity check can run."""
    start, x, y = time.perf_counter(), to_float(images), labels.long().cpu()
    model.eval()
    name, settings, attack = suite(mode, 2)[-1]
    correct = predict(model, x, batch_size) == y
    robust = correct.clone()
    fooled = attack_robust(model, attack, x, y, robust, threat.norm, threat.eps, batch_size)
    if progress is not None:
        progress(1, 1, name)
    return {
        "mode": mode, "threat_model": {"norm": threat.norm, "eps": threat.eps}, "n": len(y),
        "clean_accuracy": correct.float().mean().item(),
        "robust_accuracy": robust.float().mean().item(), "upper_bound": True,
        "attacks": [{"name": name, "settings": settings, "fooled": fooled,
                     "robust_accuracy": robust.float().mean().item()}],
        "seconds": round(time.perf_counter() - start, 3),
    }


PAPER_EPS = {"linf": 8 / 255, "l2": 128 / 255}


def evaluate_checkpoint(
    path: str | Path,
    labels: float = 500,
    heads: tuple[str, ...] = ("nonrobust",),
    norm: str | None = None,
    eps: float | None = None,
    mode: str = "full",
    n_test: int = 1000,
    data: str | None = None,
    head_config: HeadConfig | None = None,
    val_size: int = VAL_SIZE,
    seed: int = 0,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """`byorl evaluate`: fit each head (HEAD_KINDS) on a seeded label subset of the training
    split, stop early on the held-out validation images, and attack the classifier on `n_test`
    seeded random test images (0: all). The threat model defaults to the run's when the norm is
    the run's, else to the paper's eps for that norm. Each head's W and b are in the report."""
    if unknown := set(heads) - set(HEAD_KINDS):
        raise ValueError(f"heads must be among {HEAD_KINDS}, got {sorted(unknown)}")
    encoder, config = load_encoder(path, map_location=pick_device(device))
    run_attack = config["attack"]
    norm = norm or run_attack["norm"]
    if eps is None:
        eps = run_attack["eps"] if norm == run_attack["norm"] else PAPER_EPS[norm]
    threat = ThreatModel(norm, eps)
    source = data or config["data"]["source"]
    load = dict(size=config["data"]["image_size"], root=config["data"]["root"])
    train, test = load_images(source, "train", **load), load_images(source, "test", **load)
    labeled_idx, val_idx = label_subset(len(train), labels, seed, val_size)
    test = test.random_subset(n_test, seed)
    report = {
        "checkpoint": str(path), "encoder": config["model"], "encoder_attack": run_attack,
        "data": source, "labels": {"amount": labels, "count": len(labeled_idx),
                                   "val_size": val_size, "seed": seed},
        "classes": train.classes, "n_test": len(test), "test_seed": seed,
        "threat_model": {"norm": norm, "eps": eps}, "mode": mode,
        "heads": {},
    }
    for kind in heads:
        hc = (head_config or HeadConfig()).updated(robust=kind == "robust", norm=norm, eps=eps)
        head, history = fit_head(kind, encoder, train.subset(labeled_idx), train.subset(val_idx),
                                 len(train.classes), hc, progress)
        result = evaluate_robustness(Classifier(encoder, head), test.images, test.labels, threat,
                                     mode, progress=progress)
        report["heads"][kind] = {"config": hc.model_dump(), "history": history,
                                 "evaluation": result, "linear": linear_to_lists(head)}
    return report


def write_report(report: dict, out: str | Path) -> list[Path]:
    """evaluation.json and evaluation.md in `out`, each written atomically."""
    out = Path(out)
    paths = [out / "evaluation.json", out / "evaluation.md"]
    atomic_write(paths[0], [(json.dumps(report, indent=2) + "\n").encode()])
    atomic_write(paths[1], [report_markdown(report).encode()])
    return paths
