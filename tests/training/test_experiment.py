"""The grid on a tiny ImageFolder: every method runs, outputs are written, reruns resume,
exported model directories and every head kind work as cells."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byorl.training.attacks import ThreatModel
from byorl.training.baselines import BaselineConfig
from byorl.training.checkpoint import load_encoder
from byorl.training.data import load_images
from byorl.training.evaluate import evaluate_robustness
from byorl.training.experiment import ExperimentConfig, cell_key, run_experiment
from byorl.training.export import export_encoder
from byorl.training.linear_classifier import Classifier, HeadConfig, linear_from

METHODS = ["byorl", "byol", "at", "uat_ft"]
AMOUNTS = [0.25, 1.0]
THREAT = ThreatModel("linf", 64 / 255)  # large: the suite breaks the tiny models fast
PNG = b"\x89PNG\r\n\x1a\n"


def write_folder(root, split: str, per_class: int, seed: int) -> None:
    """Three classes of noisy 8x8 images, one colour each."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(np.eye(3) * 0.4 + 0.3):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(colour + 0.15 * rng.standard_normal((8, 8, 3)), 0, 1)
            Image.fromarray((px * 255).astype(np.uint8)).save(d / f"{i:04d}.png")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    write_folder(root / "data", "train", 60, 0)
    write_folder(root / "data", "test", 16, 1)
    torch.set_num_threads(1)
    return ExperimentConfig(
        out=str(root / "out"), data=str(root / "data"), image_size=8, methods=METHODS,
        label_amounts=AMOUNTS, threats=[THREAT],
        pretrain={"model": {"arch": "preact_resnet_small", "proj_hidden": 32, "proj_dim": 16},
                  "attack": {"steps": 1},
                  "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "lr": 0.1}},
        heads=["nonrobust"],
        head=HeadConfig(epochs=3, decay_epoch=2, batch_size=32, min_steps=0),
        baseline=BaselineConfig(arch="preact_resnet_small", width=1, steps=6, teacher_steps=6,
                                batch_size=32, attack_steps=2, eval_every=3, eval_attack_steps=2),
        eval_mode="quick", eval_size=8, val_size=32,
    )


@pytest.fixture(scope="module")
def first_run(config):
    seen = []
    result = run_experiment(config, progress=lambda done, total, key: seen.append((done, total)))
    return result, seen


def test_every_cell_runs_and_is_reported(config, first_run):
    result, seen = first_run
    # UAT-FT with every label is adversarial training: that cell is AT's, not run twice
    keys = [cell_key(m, THREAT, a, "nonrobust" if m in ("byorl", "byol") else None)
            for m in METHODS for a in AMOUNTS if (m, a) != ("uat_ft", 1.0)]
    assert sorted(result["ran"]) == sorted(keys) and result["skipped"] == []
    assert seen == [(i + 1, len(keys)) for i in range(len(keys))]
    for row in result["rows"]:
        assert 0 <= row["robust_accuracy"] <= row["clean_accuracy"] <= 1
        assert row["eval_mode"] == "quick" and row["eval_images"] == 8
        # every method of a label amount saw the same number of labels
        assert row["num_labels"] == {0.25: 37, 1.0: 148}[row["label_amount"]]
    uat = [r for r in result["rows"] if r["method"] == "uat_ft" and r["label_amount"] < 1]
    assert 0 <= uat[0]["pseudo_label_accuracy"] <= 1
    out = config.out
    for name in ("byol", "byorl-linf"):  # encoders trained on demand, one per kind
        assert (torch.load(f"{out}/encoders/{name}/checkpoint.pt", weights_only=False)["step"]
                == 180 // 32)


def test_outputs_are_written(config, first_run):
    rows, out = first_run[0]["rows"], config.out
    with open(f"{out}/results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(METHODS) * len(AMOUNTS) - 1  # no UAT-FT at 100 %
    assert {r["method"] for r in table} == set(METHODS)
    def order(r):
        return r["method"], r["label_amount"]

    assert sorted(json.loads(open(f"{out}/results.json").read()), key=order) == sorted(rows,
                                                                                      key=order)
    markdown = open(f"{out}/results.md").read()
    assert "ε = 64/255" in markdown and "| 25% labels | 100% labels |" in markdown
    for name in ("byorl (nonrobust head)", "byol (nonrobust head)", "at", "uat_ft"):
        assert f"| {name} |" in markdown
    for metric in ("robust", "clean"):
        with open(f"{out}/figures/{metric}_accuracy_linf_64of255.png", "rb") as f:
            assert f.read(8) == PNG


def test_rerun_skips_finished_cells_and_redoes_missing_ones(config, first_run):
    cells = Path(config.out, "cells")
    written = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()}
    again = run_experiment(config)
    assert again["ran"] == [] and len(again["skipped"]) == len(written)
    assert again["rows"] == first_run[0]["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in cells.iterdir()} == written  # untouched
    key = cell_key("at", THREAT, 0.25)
    (cells / f"{key}.json").unlink()
    assert run_experiment(config)["ran"] == [key]


def test_a_cell_another_process_is_computing_is_left_to_it(config, first_run):
    """Two `byorl experiment` processes on one directory share its cells out (cell locks)."""
    key = cell_key("at", THREAT, 0.25)
    Path(config.out, "cells", f"{key}.json").unlink()
    lock = Path(config.out, "partial", f"{key}.lock")
    holder = subprocess.Popen(  # another process, working on that cell
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = run_experiment(config)
        assert result["busy"] == [key] and result["ran"] == []
        assert key not in {cell_key(r["method"], THREAT, r["label_amount"]) for r in
                           result["rows"] if not r["head"]}
    finally:
        holder.communicate("")
    result = run_experiment(config)
    assert result["ran"] == [key] and result["busy"] == []
    assert not lock.exists() and not list(Path(config.out, "partial").glob("*.lock"))


def test_a_run_of_some_methods_keeps_every_finished_cell_in_the_tables(config, first_run):
    """A study run a few methods at a time (results/reproduction) still gets one table."""
    subset = ExperimentConfig.from_dict({**config.to_dict(), "methods": ["at"]})
    result = run_experiment(subset)
    assert result["ran"] == [] and {r["method"] for r in result["rows"]} == {"at"}
    table = json.loads(Path(config.out, "results.json").read_text())
    assert {r["method"] for r in table} == set(METHODS) and len(table) == len(first_run[0]["rows"])
    assert "| byol (nonrobust head) |" in Path(config.out, "results.md").read_text()


def test_rerun_with_other_settings_refuses_to_mix(config, first_run):
    changed = ExperimentConfig.from_dict({**config.to_dict(), "eval_size": 12})
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(changed)


def test_byol_cells_refuse_a_byorl_encoder(config, first_run, tmp_path):
    wrong = ExperimentConfig.from_dict({
        **config.to_dict(), "out": str(tmp_path), "methods": ["byol"],
        "byol_checkpoint": f"{config.out}/encoders/byorl-linf"})
    with pytest.raises(ValueError, match="not BYOL"):
        run_experiment(wrong)


def test_default_evaluation_is_the_full_suite():
    assert ExperimentConfig().eval_mode == "full"


def test_an_exported_model_is_an_encoder_with_every_head_kind(config, first_run, tmp_path):
    """`encoders` takes exported model directories (no checkpoint); each head kind is a cell
    whose saved W and b give back the evaluated classifier exactly."""
    model_dir = tmp_path / "exported"
    export_encoder(f"{config.out}/encoders/byorl-linf", model_dir, images=config.data)
    cfg = ExperimentConfig.from_dict({
        **config.to_dict(), "out": str(tmp_path / "out"), "methods": ["mine"],
        "encoders": {"mine": str(model_dir)}, "label_amounts": [1.0],
        "heads": ["nonrobust", "l2", "robust"],
        "robust_head": {"robust": True, "epochs": 2, "decay_epoch": 1, "batch_size": 32,
                        "attack_steps": 1, "min_steps": 0}})
    result = run_experiment(cfg)
    assert sorted(r["head"] for r in result["rows"]) == ["l2", "nonrobust", "robust"]
    for key in result["ran"]:
        cell = json.loads((tmp_path / "out" / "cells" / f"{key}.json").read_text())
        assert cell["training"]["encoder"] == str(model_dir)
        assert cell["training"]["encoder_step"] is None  # no checkpoint in a model directory
        encoder, _ = load_encoder(model_dir)
        model = Classifier(encoder, linear_from(**cell["linear"])).eval()
        test = cell["evaluation"]
        # re-attacking the saved head reproduces the reported clean accuracy
        images = load_images(cfg.data, "test", size=8, root=cfg.data_root).random_subset(8, 0)
        again = evaluate_robustness(model, images.images, images.labels, THREAT, "quick")
        assert again["clean_accuracy"] == test["clean_accuracy"]
        # Square queried the directory's ONNX Runtime session; the white-box attacks PyTorch
        square = next(a for a in test["attacks"] if a["name"] == "square")
        assert square["settings"]["queried"] == "OnnxRuntimeEncoder"
        assert all("queried" not in a["settings"] for a in test["attacks"] if a is not square)
    l2 = next(r for r in result["rows"] if r["head"] == "l2")
    assert l2["head_l2"] is not None


def test_unknown_head_kind_is_refused(config):
    with pytest.raises(ValueError, match="head kinds"):
        ExperimentConfig.from_dict({**config.to_dict(), "heads": ["fancy"]})


@pytest.mark.parametrize("flags, message", [
    (["--eval-mode", "fast"], "'fast' is not one of 'full', 'quick'"),
    (["--labels", "0.01,lots"], "label_amounts.1: Input should be a valid number"),
    (["--threat", "linf:8/255", "--heads", "fancy"], "unknown head kinds ['fancy']"),
    (["--baseline-steps", "0"], "baseline.steps: Input should be greater than or equal to 1"),
    (["--methods", "byorl,simclr"], "unknown methods ['simclr']"),
])
def test_a_bad_flag_fails_at_once_naming_the_problem(tmp_path, flags, message):
    """Flags are merged over the saved config and validated once (pydantic): a usage error
    before anything runs or is written."""
    from typer.testing import CliRunner

    from byorl.cli import app

    out = tmp_path / "experiment"
    result = CliRunner().invoke(app, ["experiment", "--out", str(out), *flags])
    assert result.exit_code == 2, result.output
    assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert not out.exists()


def test_help_lists_the_evaluation_modes():
    from typer.testing import CliRunner

    from byorl.cli import app

    for command in ("experiment", "evaluate"):
        text = " ".join(re.sub("[│╭╮╰╯─]", " ",
                               CliRunner().invoke(app, [command, "--help"]).output).split())
        assert "<full|quick>" in text, command


def test_flags_override_the_saved_config_key_by_key(config, tmp_path):
    """--head-min-steps changes one field of the saved head protocol, --encoder adds to the
    saved encoders: the CLI builds one dict of its flags and validates it with the config."""
    from byorl.cli import merged, validated

    saved = {**config.to_dict(), "encoders": {"mine": "runs/mine"}}
    flags = {"head": {"min_steps": 7}, "encoders": {"other": "runs/other"}, "seed": None}
    cfg = validated(ExperimentConfig, merged(saved, flags))
    assert cfg.head.min_steps == 7 and cfg.head.lr == config.head.lr
    assert cfg.encoders == {"mine": "runs/mine", "other": "runs/other"}
    assert cfg.seed == config.seed and isinstance(cfg.head, HeadConfig)


def test_command_shows_a_bar_of_cells_with_time_left(config, first_run, tmp_path):
    """`byorl experiment` on a finished output directory: every cell is skipped, and progress
    is one tqdm bar of the cells (not printed lines), with the time left."""
    from typer.testing import CliRunner

    from byorl.cli import app

    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    result = CliRunner().invoke(app, ["experiment", "--config", str(tmp_path / "config.json"),
                                      "--out", config.out])
    assert result.exit_code == 0, result.output
    n = len(first_run[0]["ran"])  # every cell (no UAT-FT at 100 % labels)
    assert f"0 cells run, {n} already done" in result.stdout
    assert re.search(rf"cells: 100%.* {n}/{n} \[\d\d:\d\d<\d\d:\d\d", result.stderr)
    assert "[1/" not in result.stdout + result.stderr


class Killed(Exception):
    """The process dies in the middle of a cell's attack suite."""


SUITE_STEPS = ["apgd-ce", "apgd-dlr", "multitargeted", "square", "sanity 0 eps", "sanity 0.5 eps",
               "sanity 1 eps", "sanity 2 eps", "sanity large eps", "sanity gradients"]


def test_an_interrupted_cell_resumes_without_refitting_or_reattacking(config, first_run,
                                                                      tmp_path):
    """Killed after two of the suite's attacks, a head cell and a baseline cell keep their fitted
    classifier and the finished attacks; the rerun goes on from the third attack, then drops
    the cell's progress folder."""
    partial = tmp_path / "partial"
    for method, key in (("byorl", cell_key("byorl", THREAT, 0.25, "nonrobust")),
                        ("at", cell_key("at", THREAT, 0.25))):
        resumable = ExperimentConfig.from_dict({
            **config.to_dict(), "out": str(tmp_path), "methods": [method], "label_amounts": [0.25],
            "byorl_checkpoints": {"linf": f"{config.out}/encoders/byorl-linf"}})

        def die(done, total, what):
            if what == "apgd-dlr":
                raise Killed

        with pytest.raises(Killed):
            run_experiment(resumable, cell_progress=die)
        saved = json.loads((partial / key / "suite.json").read_text())
        assert [a["name"] for a in saved["attacks"]] == ["apgd-ce", "apgd-dlr"]
        fitted = json.loads((partial / key / "fitted.json").read_text())

        seen = []
        result = run_experiment(resumable, cell_progress=lambda *a, seen=seen: seen.append(a))
        assert key in result["ran"] and not (partial / key).exists()
        cell = json.loads((tmp_path / "cells" / f"{key}.json").read_text())
        ours = [a for a in seen if a[2] in SUITE_STEPS]
        assert ours[:8] == [(i + 1, 10, s) for i, s in enumerate(SUITE_STEPS)][2:]  # resumed
        assert cell["evaluation"]["attacks"][:2] == saved["attacks"]
        # the cell's time covers both runs: the first run's fitting and the whole suite
        assert fitted["history"]["fit_seconds"] > 0
        assert cell["row"]["seconds"] >= round(
            fitted["history"]["fit_seconds"] + cell["evaluation"]["seconds"], 1) - 0.1
        assert cell["evaluation"]["seconds"] > saved["seconds"]
        if method == "byorl":
            assert cell["linear"] == fitted["linear"]  # the head was not fitted again
            assert not any(a[2] not in SUITE_STEPS for a in seen[:8])
        else:
            assert cell["training"]["best_step"] == fitted["history"]["best_step"]
            assert all(a[2] in SUITE_STEPS for a in seen[:8])  # no training before the suite
