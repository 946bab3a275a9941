"""The paper's grid (Fig. 3/4, 7/8): methods x label amounts x threat models, resumable.

Each cell trains one classifier on a seeded label subset (the same subset for every method),
stops early on the 1024 held-out validation images, and is evaluated by the attack suite on a
seeded random subset of the test set:

- byorl / byol: a linear head on a frozen pre-trained encoder (robust head by default);
- at: adversarial training of the same architecture on the labeled images only;
- uat_ft: pseudo-labeling, then adversarial training on all training images.

A cell's result is written (atomically) as soon as it finishes, with the settings it depends
on; a rerun skips finished cells and refuses to mix in cells computed with other settings.
Encoders come from `byorl train` runs, or are trained here from `pretrain` (a TrainConfig dict)
when a cell needs one that was not given.
"""

import csv
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from index.files import atomic_write
from training.attacks import ThreatModel
from training.baselines import BaselineConfig, train_classifier, uat_ft
from training.checkpoint import load_checkpoint, load_encoder
from training.data import ImageSet, label_subset, load_images
from training.evaluate import evaluate_robustness
from training.figures import plot_accuracy, threat_label
from training.heads import Classifier, HeadConfig, Progress, fit_linear_head
from training.train import pick_device

METHODS = ("byorl", "byol", "at", "uat_ft")


@dataclass
class ExperimentConfig:
    out: str = "runs/experiment"
    data: str = "cifar10"  # a load_images source
    data_root: str = "data"
    image_size: int = 32
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    label_amounts: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 1.0])
    threats: list[ThreatModel] = field(
        default_factory=lambda: [ThreatModel("l2", 128 / 255), ThreatModel("linf", 8 / 255)]
    )
    byorl_checkpoints: dict[str, str] = field(default_factory=dict)  # norm -> run dir or file
    byol_checkpoint: str | None = None
    pretrain: dict | None = None  # TrainConfig dict to train the encoders not given
    robust_head: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)  # norm and eps are set per cell
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval_mode: str = "quick"
    eval_size: int = 1000  # random test images the suite attacks; 0 = the whole test set
    val_size: int = 1024
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        d = dict(d)
        d["threats"] = [ThreatModel(**t) for t in d.get("threats", [])] or cls().threats
        d["head"] = HeadConfig(**d.get("head", {}))
        d["baseline"] = BaselineConfig(**d.get("baseline", {}))
        return cls(**d)


def threat_slug(norm: str, eps: float) -> str:
    """'linf_8of255': a file-name friendly threat model."""
    return f"{norm}_{eps * 255:g}of255"


def cell_key(method: str, threat: ThreatModel, amount: float) -> str:
    return f"{method}_{threat_slug(threat.norm, threat.eps)}_labels{amount:g}"


def _write_json(path: Path, obj) -> None:
    atomic_write(path, [(json.dumps(obj, indent=2) + "\n").encode()])


def _encoder_name(method: str, threat: ThreatModel) -> str:
    return "byol" if method == "byol" else f"byorl-{threat.norm}"


def _given_checkpoint(config: ExperimentConfig, method: str, threat: ThreatModel) -> str | None:
    return config.byol_checkpoint if method == "byol" else config.byorl_checkpoints.get(threat.norm)


def encoder_checkpoint(config: ExperimentConfig, method: str, threat: ThreatModel) -> str:
    """The given checkpoint of the cell's encoder, or one trained from `config.pretrain`."""
    given = _given_checkpoint(config, method, threat)
    if given:
        return given
    if config.pretrain is None:
        raise ValueError(f"no {_encoder_name(method, threat)} checkpoint given and no pretrain "
                         "config to train one")
    from training.config import TrainConfig
    from training.train import train

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
    """A BYOL cell needs a run without attack, a BYORL cell one attacked in the cell's norm."""
    attack = train_config["attack"]
    if method == "byol" and attack["method"] != "none":
        raise ValueError(f"{path} is a BYORL run ({attack['method']}), not BYOL")
    if method == "byorl" and (attack["method"] == "none" or attack["norm"] != threat.norm):
        raise ValueError(f"{path} was not trained against {threat.norm} attacks: {attack}")


def _cell_settings(config: ExperimentConfig, method: str, threat: ThreatModel) -> dict:
    """What a cell's result depends on besides its coordinates: reruns must agree on it."""
    common = {k: getattr(config, k) for k in
              ("data", "image_size", "eval_mode", "eval_size", "val_size", "seed")}
    if method in ("at", "uat_ft"):
        baseline = dataclasses.asdict(config.baseline)
        baseline.pop("device")
        return {**common, "baseline": baseline}
    given = _given_checkpoint(config, method, threat)
    return {**common, "robust_head": config.robust_head, "head": dataclasses.asdict(config.head),
            "encoder": given or {"pretrain": config.pretrain}}


def run_cell(
    config: ExperimentConfig,
    method: str,
    amount: float,
    threat: ThreatModel,
    train: ImageSet,
    test: ImageSet,
    progress: Progress | None = None,
) -> dict:
    """Train and evaluate one cell; returns its result row (plus training and evaluation logs)."""
    start, device = time.perf_counter(), pick_device(config.device)
    num_classes = len(train.classes)
    labeled_idx, val_idx = label_subset(len(train), amount, config.seed, config.val_size)
    labeled, val = train.subset(labeled_idx), train.subset(val_idx)
    baseline = dataclasses.replace(config.baseline, device=str(device))
    extra: dict = {}
    if method in ("byorl", "byol"):
        path = encoder_checkpoint(config, method, threat)
        encoder, train_config = load_encoder(path, map_location=device)
        _check_encoder(method, threat, train_config, path)
        head_config = dataclasses.replace(config.head, robust=config.robust_head,
                                          norm=threat.norm, eps=threat.eps)
        head, history = fit_linear_head(encoder, labeled, val, num_classes, head_config, progress)
        model = Classifier(encoder, head)
        extra = {"encoder": path, "encoder_step": load_checkpoint(path)["step"],
                 "encoder_attack": train_config["attack"]}
    elif method == "at":
        model, history = train_classifier(labeled, val, num_classes, baseline, threat,
                                          progress=progress)
    else:
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[labeled_idx], rest[val_idx] = False, False
        model, history = uat_ft(labeled, train.images[rest], val, num_classes, threat, baseline,
                                progress)
        pseudo = history.pop("pseudo_labels")
        if len(pseudo):
            extra["pseudo_label_accuracy"] = (pseudo == train.labels[rest]).float().mean().item()
    evaluation = evaluate_robustness(model, test.images, test.labels, threat, config.eval_mode,
                                     progress=progress)
    row = {
        "method": method,
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
        "seconds": round(time.perf_counter() - start, 1),
        **{k: v for k, v in extra.items() if k != "encoder_attack"},
    }
    return {"row": row, "settings": _cell_settings(config, method, threat),
            "training": {**history, **extra}, "evaluation": evaluation}


def run_experiment(
    config: ExperimentConfig,
    progress: Progress | None = None,
    cell_progress: Progress | None = None,
) -> dict:
    """Run every unfinished cell, then write the tables and figures of all finished ones.

    Returns {"rows": [...], "ran": [keys computed now], "skipped": [keys already done]}.
    `progress(done, total, key)` follows the cells; `cell_progress` is handed to the trainers.
    """
    out = Path(config.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    grid = [(m, a, t) for t in config.threats for m in config.methods for a in config.label_amounts]
    ran, skipped, rows = [], [], []
    data = None
    for i, (method, amount, threat) in enumerate(grid):
        key = cell_key(method, threat, amount)
        path = cells_dir / f"{key}.json"
        if path.exists():
            cell = json.loads(path.read_text())
            if cell["settings"] != json.loads(json.dumps(_cell_settings(config, method, threat))):
                raise ValueError(f"{path} was computed with other settings; delete it or use "
                                 "another output directory")
            skipped.append(key)
        else:
            if data is None:
                load = dict(size=config.image_size, root=config.data_root)
                data = (load_images(config.data, "train", **load),
                        load_images(config.data, "test", **load).random_subset(
                            config.eval_size, config.seed))
            cell = run_cell(config, method, amount, threat, *data, progress=cell_progress)
            _write_json(path, cell)
            ran.append(key)
        rows.append(cell["row"])
        if progress is not None:
            progress(i + 1, len(grid), key)
    write_results(rows, out)
    return {"rows": rows, "ran": ran, "skipped": skipped}


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def results_markdown(rows: list[dict]) -> str:
    """Per threat model, a method x label-fraction table of robust (clean) accuracy."""
    lines = []
    for norm, eps in sorted({(r["norm"], r["eps"]) for r in rows}):
        part = [r for r in rows if (r["norm"], r["eps"]) == (norm, eps)]
        fractions = sorted({r["label_fraction"] for r in part})
        modes = sorted({f"{r['eval_mode']} suite on {r['eval_images']} test images" for r in part})
        header = " | ".join(f"{100 * f:.3g}% labels" for f in fractions)
        lines += [f"## {threat_label(norm, eps)}", "",
                  f"Robust accuracy (clean accuracy in brackets); evaluation: {'; '.join(modes)}.",
                  "", f"| method | {header} |", "|---" * (len(fractions) + 1) + "|"]
        for method in [m for m in METHODS if any(r["method"] == m for r in part)]:
            cells = {r["label_fraction"]: r for r in part if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(
                f"{_percent(c['robust_accuracy'])} ({_percent(c['clean_accuracy'])})"
                if (c := cells.get(f)) else "" for f in fractions) + " |")
        lines.append("")
    return "\n".join(lines)


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
