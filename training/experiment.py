"""The paper's grid (Fig. 3/4, 7/8): methods x label amounts x threat models, resumable.

Each cell trains one classifier on a seeded label subset (the same subset for every method),
stops early on the 1024 held-out validation images, and is evaluated by the attack suite (the
paper's full suite by default) on a seeded random subset of the test set:

- byorl / byol, and any encoder named in `encoders`: a linear head on the frozen encoder, one
  cell per head kind in `heads` (byorl.training.linear_classifier.HEAD_KINDS), its W and b saved
  in the cell;
- at: adversarial training of the same architecture on the labeled images only;
- uat_ft: pseudo-labeling, then adversarial training on all training images.

A cell's result is written (atomically) as soon as it finishes, with the settings it depends
on; a rerun skips finished cells and refuses to mix in cells computed with other settings. A
cell in progress keeps a baseline's training checkpoints (every 100 steps), its fitted
classifier and the attack suite's progress (saved after every attacked batch) in
`partial/<key>/`, so an interrupted cell goes on where it
stopped, on this machine or, once that folder is copied, on another.
Encoders come from `byorl train` runs, or are trained here from `pretrain` (a TrainConfig dict)
when a cell needs one that was not given.
"""

import contextlib
import csv
import fcntl
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import Field, model_validator

from byorl.files import atomic_write
from byorl.model_dir import CARD, ONNX, read_card
from byorl.training.attacks import ThreatModel
from byorl.training.baselines import BaselineConfig, new_classifier, train_classifier, uat_ft
from byorl.training.checkpoint import checkpoint_path, load_checkpoint, load_encoder, save_atomic
from byorl.training.config import Config, EvalMode
from byorl.training.data import ImageSet, label_subset, load_images
from byorl.training.device import pick_device
from byorl.training.evaluate import evaluate_robustness
from byorl.training.figures import plot_accuracy
from byorl.training.linear_classifier import (
    HEAD_KINDS,
    Classifier,
    HeadConfig,
    Progress,
    fit_head,
    linear_from,
    linear_to_lists,
)
from byorl.training.onnx_encoder import OnnxRuntimeEncoder
from byorl.training.reports import results_markdown, threat_label

METHODS = ("byorl", "byol", "at", "uat_ft")


class ExperimentConfig(Config):
    out: str = "runs/experiment"
    data: str = "cifar10"  # a load_images source
    data_root: str = "data"
    image_size: int = 32
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    label_amounts: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 1.0])
    threats: list[ThreatModel] = Field(
        default_factory=lambda: [ThreatModel("l2", 128 / 255), ThreatModel("linf", 8 / 255)]
    )
    byorl_checkpoints: dict[str, str] = Field(default_factory=dict)  # norm -> run dir or file
    byol_checkpoint: str | None = None
    encoders: dict[str, str] = Field(default_factory=dict)  # more methods: name -> encoder
    pretrain: dict | None = None  # TrainConfig dict to train the encoders not given
    heads: list[str] = Field(default_factory=lambda: ["robust"])  # head kinds per encoder cell
    head: HeadConfig = Field(default_factory=HeadConfig)  # nonrobust, l2 heads; norm/eps: cell's
    robust_head: HeadConfig = Field(default_factory=lambda: HeadConfig(robust=True))
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval_mode: EvalMode = "full"
    eval_size: int = 1000  # random test images the suite attacks; 0 = the whole test set
    eval_batch_size: int = 64  # points per attacked batch; a cell's progress is saved after each
    val_size: int = 1024
    device: str = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _known_names(self) -> "ExperimentConfig":
        if clash := set(self.encoders) & set(METHODS):
            raise ValueError(f"encoder names {sorted(clash)} are taken by built-in methods")
        if unknown := set(self.methods) - set(METHODS) - set(self.encoders):
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS} or name "
                             "an encoder in `encoders`")
        if unknown := set(self.heads) - set(HEAD_KINDS):
            raise ValueError(f"unknown head kinds {sorted(unknown)}; choose from {HEAD_KINDS}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """Validated once, nested configs included: a wrong type, an unknown field or a refused
        value raises `ValidationError` naming the field."""
        if not d.get("threats", True):  # an empty list: the default threat models
            d = {k: v for k, v in d.items() if k != "threats"}
        return cls.model_validate(d)


def threat_slug(norm: str, eps: float) -> str:
    """'linf_8of255': a file-name friendly threat model."""
    return f"{norm}_{eps * 255:g}of255"


def cell_key(method: str, threat: ThreatModel, amount: float, head: str | None = None) -> str:
    """e.g. 'byorl_linf_8of255_labels500_l2'; baselines (no head) end at the labels."""
    key = f"{method}_{threat_slug(threat.norm, threat.eps)}_labels{amount:g}"
    return f"{key}_{head}" if head else key


def uses_encoder(config: ExperimentConfig, method: str) -> bool:
    """Whether the method's cells are linear heads on a frozen encoder (not a baseline)."""
    return method in ("byorl", "byol") or method in config.encoders


def head_config(config: ExperimentConfig, kind: str, threat: ThreatModel) -> HeadConfig:
    """The protocol of a head kind in a cell of this threat model."""
    base = config.robust_head if kind == "robust" else config.head
    return base.updated(robust=kind == "robust", norm=threat.norm, eps=threat.eps)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, [(json.dumps(obj, indent=2) + "\n").encode()])


def _encoder_name(method: str, threat: ThreatModel) -> str:
    return "byol" if method == "byol" else f"byorl-{threat.norm}"


def _given_checkpoint(config: ExperimentConfig, method: str, threat: ThreatModel) -> str | None:
    if method in config.encoders:
        return config.encoders[method]
    return config.byol_checkpoint if method == "byol" else config.byorl_checkpoints.get(threat.norm)


def encoder_checkpoint(config: ExperimentConfig, method: str, threat: ThreatModel) -> str:
    """The given checkpoint of the cell's encoder, or one trained from `config.pretrain`."""
    given = _given_checkpoint(config, method, threat)
    if given:
        return given
    if config.pretrain is None:
        raise ValueError(f"no {_encoder_name(method, threat)} checkpoint given and no pretrain "
                         "config to train one")
    from byorl.training.config import TrainConfig
    from byorl.training.train import train

    cfg = TrainConfig.from_dict(config.pretrain)
    cfg.data.source, cfg.data.root = config.data, config.data_root
    cfg.data.image_size, cfg.seed = config.image_size, config.seed
    cfg.out = str(Path(config.out) / "encoders" / _encoder_name(method, threat))
    if method == "byol":
        cfg.attack.method = "none"
    else:
        cfg.attack.norm, cfg.attack.eps = threat.norm, threat.eps
        cfg.attack.method = "apgd" if cfg.attack.method == "none" else cfg.attack.method
    return str(train(cfg, progress=False))


def _check_encoder(method: str, threat: ThreatModel, train_config: dict, path: str) -> None:
    """A BYOL cell needs a run without attack, a BYORL cell one attacked in the cell's norm;
    named encoders may be either."""
    attack = train_config["attack"]
    if method == "byol" and attack["method"] != "none":
        raise ValueError(f"{path} is a BYORL run ({attack['method']}), not BYOL")
    if method == "byorl" and (attack["method"] == "none" or attack["norm"] != threat.norm):
        raise ValueError(f"{path} was not trained against {threat.norm} attacks: {attack}")


def _cell_settings(config: ExperimentConfig, method: str, threat: ThreatModel,
                   head: str | None = None) -> dict:
    """What a cell's result depends on besides its coordinates: reruns must agree on it."""
    common = {k: getattr(config, k) for k in
              ("data", "image_size", "eval_mode", "eval_size", "val_size", "seed")}
    if method in ("at", "uat_ft"):
        baseline = config.baseline.model_dump()
        baseline.pop("device")
        return {**common, "baseline": baseline}
    given = _given_checkpoint(config, method, threat)
    encoder = given or {"pretrain": config.pretrain}
    if given and (Path(given) / CARD).is_file():  # a model directory: pin its exact weights
        encoder = {"path": given, "onnx_sha256": read_card(given)["onnx_sha256"]}
    return {**common, "head": head_config(config, head, threat).model_dump(),
            "encoder": encoder}


def _resumed(partial: Path | None, fit, save, load):
    """What `fit()` returns, saved under `partial`; loaded instead when an earlier run of the
    same cell saved it (fitting a robust head or a baseline takes up to an hour)."""
    done = partial / "fitted.json" if partial is not None else None
    if done is not None and done.is_file():
        return load(json.loads(done.read_text()))
    start = time.perf_counter()
    fitted = fit()
    fitted[1]["fit_seconds"] = round(time.perf_counter() - start, 3)  # kept when resumed
    if done is not None:
        partial.mkdir(parents=True, exist_ok=True)
        _write_json(done, save(*fitted))
    return fitted


def _onnx_classifier(path: str, head: torch.nn.Linear, device: torch.device) -> Classifier | None:
    """An exported encoder's ONNX Runtime session + the head, for the suite's black-box Square
    (its forward passes are 1.3x faster on this CPU than PyTorch's); None for a checkpoint or
    on a GPU."""
    if device.type != "cpu" or not (Path(path) / ONNX).is_file():
        return None
    encoder = OnnxRuntimeEncoder(str(Path(path) / ONNX), torch.get_num_threads())
    return Classifier(encoder, head).eval()


def run_cell(
    config: ExperimentConfig,
    method: str,
    amount: float,
    threat: ThreatModel,
    train: ImageSet,
    test: ImageSet,
    progress: Progress | None = None,
    head_kind: str | None = None,
    partial: Path | None = None,
) -> dict:
    """Train and evaluate one cell (an encoder method's with the head of `head_kind`); returns
    its result row (plus training and evaluation logs).

    Args:
        partial: a folder for the cell's progress (its fitted classifier, the suite's state):
            a run given the folder of an interrupted one resumes it.
    """
    start, device = time.perf_counter(), pick_device(config.device)
    num_classes = len(train.classes)
    labeled_idx, val_idx = label_subset(len(train), amount, config.seed, config.val_size)
    labeled, val = train.subset(labeled_idx), train.subset(val_idx)
    baseline = config.baseline.updated(device=str(device))
    extra: dict = {}
    if uses_encoder(config, method):
        path = encoder_checkpoint(config, method, threat)
        encoder, train_config = load_encoder(path, map_location=device)
        _check_encoder(method, threat, train_config, path)
        head, history = _resumed(
            partial,
            lambda: fit_head(head_kind, encoder, labeled, val, num_classes,
                             head_config(config, head_kind, threat), progress),
            lambda head, history: {"linear": linear_to_lists(head), "history": history},
            lambda d: (linear_from(**d["linear"]).to(device), d["history"]))
        model = Classifier(encoder, head)
        black_box = _onnx_classifier(path, head, device)
        step = load_checkpoint(path)["step"] if checkpoint_path(path).is_file() else None
        extra = {"encoder": path, "encoder_step": step,  # None: an exported model directory
                 "encoder_epochs": train_config["optim"]["epochs"],
                 "encoder_attack": train_config["attack"], "head_l2": history.get("l2")}
    else:
        black_box = None
        model, history = _resumed(
            partial, lambda: _baseline(method, train, labeled, val, labeled_idx, val_idx,
                                       threat, baseline, progress, partial),
            lambda model, history: _save_baseline(model, history, partial),
            lambda d: _load_baseline(d, config, num_classes, partial, device))
        if "pseudo_label_accuracy" in history:
            extra["pseudo_label_accuracy"] = history.pop("pseudo_label_accuracy")
    evaluation = evaluate_robustness(
        model, test.images, test.labels, threat, config.eval_mode,
        batch_size=config.eval_batch_size, progress=progress,
        state=partial / "suite.json" if partial is not None else None, black_box=black_box)
    row = {
        "method": method,
        "head": head_kind or "",
        "norm": threat.norm,
        "eps": threat.eps,
        "label_amount": amount,
        "num_labels": len(labeled_idx),
        "label_fraction": len(labeled_idx) / (len(train) - config.val_size),
        "clean_accuracy": evaluation["clean_accuracy"],
        "robust_accuracy": evaluation["robust_accuracy"],
        "eval_mode": evaluation["mode"],
        "eval_images": evaluation["n"],
        "checks_passed": evaluation["checks_passed"],
        # fitting + the suite, summed over the runs that resumed the cell (this run alone when
        # an older fitted.json has no time)
        "seconds": round(max(time.perf_counter() - start,
                             history.get("fit_seconds", 0) + evaluation["seconds"]), 1),
        **{k: v for k, v in extra.items() if k != "encoder_attack"},
    }
    cell = {"row": row, "settings": _cell_settings(config, method, threat, head_kind),
            "training": {**history, **extra}, "evaluation": evaluation}
    if head_kind:
        cell["linear"] = linear_to_lists(head)
    return cell


def _baseline(method, train, labeled, val, labeled_idx, val_idx, threat, baseline, progress,
              partial: Path | None):
    """AT on the labeled images, or UAT-FT on all of them (its pseudo-labels scored here); the
    trainings checkpoint into `partial` (an hour of CPU each: a new machine goes on from there)."""
    num_classes = len(train.classes)
    if method == "at":
        return train_classifier(labeled, val, num_classes, baseline, threat, progress=progress,
                                state=partial / "at.pt" if partial is not None else None)
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[labeled_idx], rest[val_idx] = False, False
    model, history = uat_ft(labeled, train.images[rest], val, num_classes, threat, baseline,
                            progress, checkpoints=partial)
    pseudo = history.pop("pseudo_labels")
    if len(pseudo):
        history["pseudo_label_accuracy"] = (pseudo == train.labels[rest]).float().mean().item()
    return model, history


def _save_baseline(model, history, partial: Path) -> dict:
    save_atomic(model.state_dict(), partial / "model.pt")
    return {"history": history}


def _load_baseline(saved, config, num_classes, partial: Path, device):
    model = new_classifier(config.baseline.arch, config.baseline.width, num_classes)
    model.load_state_dict(torch.load(partial / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), saved["history"]


def run_experiment(
    config: ExperimentConfig,
    progress: Progress | None = None,
    cell_progress: Progress | None = None,
) -> dict:
    """Run every unfinished cell, then write the tables and figures of all finished ones.

    Returns {"rows": [...], "ran": [keys computed now], "skipped": [keys already done],
    "busy": [keys another process on `config.out` is computing: run several to share a grid]}.
    `progress(done, total, key)` follows the cells; `cell_progress` is handed to the trainers.
    """
    out = Path(config.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    grid = [(m, a, t, h) for t in config.threats for m in config.methods
            for a in config.label_amounts
            for h in (config.heads if uses_encoder(config, m) else [None])
            if not (m == "uat_ft" and a == 1.0 and "at" in config.methods)]  # = AT (section 4.1)
    ran, skipped, busy, rows = [], [], [], []
    data = None
    for i, (method, amount, threat, head) in enumerate(grid):
        key = cell_key(method, threat, amount, head)
        path = cells_dir / f"{key}.json"
        settings = json.loads(json.dumps(_cell_settings(config, method, threat, head)))
        with _cell_lock(out / "partial" / f"{key}.lock", path) as mine:
            if not mine:  # another `byorl experiment` on this directory is computing it
                busy.append(key)
                continue
            if path.exists():
                cell = json.loads(path.read_text())
                if cell["settings"] != settings:
                    raise ValueError(f"{path} was computed with other settings; delete it or "
                                     "use another output directory")
                skipped.append(key)
            else:
                if data is None:
                    load = dict(size=config.image_size, root=config.data_root)
                    data = (load_images(config.data, "train", **load),
                            load_images(config.data, "test", **load).random_subset(
                                config.eval_size, config.seed))
                partial = out / "partial" / key
                _check_partial(partial, settings)
                cell = run_cell(config, method, amount, threat, *data, progress=cell_progress,
                                head_kind=head, partial=partial)
                _write_json(path, cell)
                shutil.rmtree(partial)
                ran.append(key)
        rows.append(cell["row"])
        if progress is not None:
            progress(i + 1, len(grid), key)
    write_results(finished_rows(cells_dir), out)
    return {"rows": rows, "ran": ran, "skipped": skipped, "busy": busy}


@contextlib.contextmanager
def _cell_lock(lock: Path, cell: Path) -> Iterator[bool]:
    """Whether this process may work on the cell written to `cell`: true when it is finished or
    when this process holds the exclusive `flock` on `lock` (released when the block ends or the
    process dies), so that several `byorl experiment` processes on one output directory share
    out its cells, one each (a grid can keep one single-threaded process per core busy). The
    lock file goes once the cell is written (anyone who locked it since sees the cell file)."""
    if cell.exists():
        yield True
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            if cell.exists():
                lock.unlink(missing_ok=True)


def finished_rows(cells_dir: Path) -> list[dict]:
    """The rows of every finished cell of an output directory, this run's grid or an earlier
    one's: a study run a few methods at a time still gets one table of all of them."""
    return [json.loads(path.read_text())["row"] for path in sorted(cells_dir.glob("*.json"))]


def _check_partial(partial: Path, settings: dict) -> None:
    """A cell's progress may only resume under the settings it was made with."""
    pinned = partial / "settings.json"
    if pinned.is_file() and json.loads(pinned.read_text()) != settings:
        raise ValueError(f"{partial} holds the progress of this cell under other settings; "
                         "delete it or use another output directory")
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(pinned, settings)


def write_results(rows: list[dict], out: str | Path) -> list[Path]:
    """results.json, results.csv, results.md, and per threat model the robust and clean
    accuracy figures (figures/{robust,clean}_accuracy_<threat>.png); returns the paths."""
    out = Path(out)
    _write_json(out / "results.json", rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO()
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", [table.getvalue().encode()])
    atomic_write(out / "results.md", [results_markdown(rows).encode()])
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    for norm, eps in sorted({(r["norm"], r["eps"]) for r in rows}):
        part = [r for r in rows if (r["norm"], r["eps"]) == (norm, eps)]
        for metric in ("robust_accuracy", "clean_accuracy"):
            name = f"figures/{metric}_{threat_slug(norm, eps)}.png"
            paths.append(plot_accuracy(part, metric, out / name, threat_label(norm, eps)))
    return paths
