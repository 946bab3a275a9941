"""results/collect_metrics.py on the output of a `byorl experiment`: the model cards' metrics."""

import json
import shutil
from pathlib import Path

from tests.results.conftest import ROOT, load_script

STUDY = ROOT / "results" / "reproduction"


def fake_run(path: Path, out: str, steps: tuple = (10, 20)) -> None:
    """A training run's config.json and metrics.jsonl (one record per logged step)."""
    path.mkdir(parents=True)
    config = json.loads((ROOT / "results/cpu-default-v2/train-byorl-linf/config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "out": out}))
    log = [{"step": s, "epoch": s / 390, "loss": 1.0, "cos_clean": 0.8, "cos_adv": 0.7,
            "pred_std": 0.06, "images_per_s": 128.0} for s in steps]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def make_study(methods: dict) -> Path:
    """study/ as `byorl experiment` of the methods byorl and byol writes it, with the study's
    cells of each source encoder renamed to its method (methods: source -> method)."""
    study = Path("study")
    (study / "cells").mkdir(parents=True)
    for source, method in methods.items():
        for path in (STUDY / "cells").glob(f"{source}_*.json"):
            shutil.copy(path, study / "cells" / path.name.replace(source, method, 1))
    exported = Path("exported-byol")  # a model directory: its card names the run
    exported.mkdir()
    (exported / "card.json").write_text(json.dumps({"training": {"config": {"out": "runs/y"}}}))
    config = {"data": "cifar.tar.gz", "byorl_checkpoints": {"linf": "runs/b"},
              "byol_checkpoint": str(exported)}
    (study / "config.json").write_text(json.dumps(config))
    return study


def test_cells_become_card_metrics_with_every_head_and_its_cell(tmp_path, monkeypatch):
    """The study's byorl-pgd3 and byol cells, renamed as an experiment of the methods byorl and
    byol would write them: each head at each label amount, its accuracies as the cell has them,
    the cell file (the fitted head) and the command; the training summary from the run's log."""
    monkeypatch.chdir(tmp_path)
    study = make_study({"byorl-pgd3": "byorl", "byol": "byol"})
    fake_run(Path("runs/b"), "runs/b")
    fake_run(Path("runs/y"), "runs/y")

    metrics = load_script("collect_metrics").collect_cells(study)
    cell = json.loads((STUDY / "cells/byorl-pgd3_linf_8of255_labels500_l2.json").read_text())
    head = metrics["byorl"]["evaluations"]["500_labels"]["heads"]["l2"]
    assert head["robust_accuracy"] == cell["row"]["robust_accuracy"]
    assert head["clean_accuracy"] == cell["row"]["clean_accuracy"]
    assert head["l2"] == cell["training"]["l2"] and head["checks_passed"]
    assert json.loads(Path(head["cell"]).read_text())["linear"] == cell["linear"]
    assert head["command"] == "byorl experiment --config study/experiment.json --out study"
    for model in ("byorl", "byol"):
        evaluations = metrics[model]["evaluations"]
        assert set(evaluations) == {"500_labels", "all_labels"}
        assert evaluations["all_labels"]["labels"] == 48976
        for evaluation in evaluations.values():
            assert evaluation["mode"] == "full" and evaluation["n_test"] == 500
            assert {"nonrobust", "l2"} <= set(evaluation["heads"])
    training = metrics["byol"]["training"]
    assert training["steps"] == 20 and training["images_seen"] == 20 * 128
    assert training["wall_clock_min"] == round(2 * 10 * 128 / 128 / 60, 1)
    assert training["command"] == "byorl train --config study/train-byol/config.json --out runs/y"


def test_a_step_logged_twice_after_a_resume_counts_once(tmp_path):
    """A resume from the checkpoint at step 10 re-does step 20: the wall clock sums two logged
    stretches of 10 steps of 128 images at 128 images/s, not three."""
    fake_run(tmp_path / "run", "runs/x", steps=(10, 20, 20))
    training = load_script("collect_metrics").training_summary(tmp_path / "run", "byorl-linf")
    assert training["steps"] == 20
    assert training["wall_clock_min"] == round(2 * 10 * 128 / 128 / 60, 1)


def test_a_method_without_finished_cells_is_left_out(tmp_path, monkeypatch):
    """BYORL's cells finished while BYOL's encoder is still training (no run log yet): the
    metrics hold BYORL alone, and BYOL's missing run is not read."""
    monkeypatch.chdir(tmp_path)
    study = make_study({"byorl-pgd3": "byorl"})
    fake_run(Path("runs/b"), "runs/b")
    metrics = load_script("collect_metrics").collect_cells(study)
    assert set(metrics) == {"byorl"}
    assert set(metrics["byorl"]["evaluations"]) == {"500_labels", "all_labels"}
