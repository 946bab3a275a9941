"""Collect the evaluations and training logs of the CPU reference runs into one metrics.json
(the model cards' `metrics`, the README table's source).

    python results/collect_metrics.py runs/final results/cpu-default/metrics.json
    python results/collect_metrics.py results/cpu-default-v2 results/cpu-default-v2/metrics.json

The source is either a folder of `byorl evaluate` reports (runs/final/NAME-LABELS-HEAD/) or the
output of a `byorl experiment` over the methods `byorl` and `byol` (its `cells/`, whose files
hold each cell's fitted head).
"""

import json
import sys
from pathlib import Path

MODELS = {"byorl": "byorl-linf", "byol": "byol"}
LABELS = {"500_labels": "500", "all_labels": "1.0"}


def evaluate_command(report: dict, kind: str, out: Path) -> str:
    """The `byorl evaluate` call that wrote a report, rebuilt from what the report records."""
    head = report["heads"][kind]["config"]
    cmd = (f"byorl evaluate {report['checkpoint']} --labels {report['labels']['amount']:g} "
           f"--head {kind} --mode {report['mode']} --n-test {report['n_test']} --device cpu")
    if kind == "robust":
        cmd += (f" --head-attack-steps {head['attack_steps']} --head-epochs {head['epochs']}"
                f" --head-steps-per-epoch {head['steps_per_epoch']}")
    return cmd + f" --out {out}"


def training_summary(run: Path, name: str, results: str = "results/cpu-default") -> dict:
    """Steps, epochs and wall clock (summed from the logged throughput) of a run, and the train
    command from its config as kept in RESULTS/train-NAME/. A step logged twice (re-done after a
    resume from an earlier checkpoint) counts once: its last record."""
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    log = list({r["step"]: r for r in records}.values())
    batch, every = config["optim"]["batch_size"], config["log_every"]
    last = log[-1]
    return {
        "steps": last["step"], "epochs": round(last["epoch"], 2),
        "images_seen": last["step"] * batch,
        "wall_clock_min": round(sum(every * batch / r["images_per_s"] for r in log) / 60, 1),
        "final_loss": round(last["loss"], 4), "final_cos_clean": round(last["cos_clean"], 4),
        "final_cos_adv": round(last["cos_adv"], 4), "final_pred_std": round(last["pred_std"], 4),
        "config": config,
        "command": f"byorl train --config {results}/train-{name}/config.json"
                   f" --out {config['out']}",
        "reproduce_all": f"bash {results}/reproduce.sh",
    }


def training_run(encoder: str) -> Path:
    """An experiment's encoder as its training run: a run directory is one, an exported model
    directory names its run in its card."""
    card = Path(encoder) / "card.json"
    if card.is_file():
        return Path(json.loads(card.read_text())["training"]["config"]["out"])
    return Path(encoder)


def collect_cells(study: Path) -> dict:
    """metrics.json from a `byorl experiment` of the methods byorl and byol: every head kind
    at every label amount, each with its cell file (fitted W and b, the full record). A method
    with no finished cell yet is left out (BYORL's card can ship before BYOL's cells exist)."""
    config = json.loads((study / "config.json").read_text())
    command = f"byorl experiment --config {study}/experiment.json --out {study}"
    runs = {"byorl": training_run(config["byorl_checkpoints"]["linf"]),
            "byol": training_run(config["byol_checkpoint"])}
    metrics = {}
    for model, name in MODELS.items():
        evaluations = {}
        for path in sorted((study / "cells").glob(f"{model}_*.json")):
            cell = json.loads(path.read_text())
            row, ev = cell["row"], cell["evaluation"]
            key = "all_labels" if row["label_amount"] == 1 else f"{row['num_labels']}_labels"
            evaluation = evaluations.setdefault(key, {
                "threat_model": ev["threat_model"], "mode": ev["mode"], "data": config["data"],
                "labels": row["num_labels"], "n_test": ev["n"], "heads": {}})
            evaluation["heads"][row["head"]] = {
                "clean_accuracy": row["clean_accuracy"], "robust_accuracy": row["robust_accuracy"],
                "checks_passed": row["checks_passed"], "l2": row["head_l2"],
                "minutes": round(row["seconds"] / 60, 1), "cell": str(path), "command": command}
        if not evaluations:
            continue
        metrics[model] = {"evaluations": evaluations,
                          "training": training_summary(runs[model], name, str(study))}
    return metrics


def main(source: Path, out: Path) -> None:
    metrics = collect_cells(source) if (source / "cells").is_dir() else collect_reports(source)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(results_table(metrics))
    print(f"-> {out}")


def collect_reports(final: Path) -> dict:
    """metrics.json from `byorl evaluate` reports: nonrobust and robust heads, 500 and all
    labels, as runs/final/NAME-LABELS-HEAD/evaluation.json."""
    metrics = {}
    for model, name in MODELS.items():
        evaluations = {}
        for key, labels in LABELS.items():
            heads = {}
            for kind in ("nonrobust", "robust"):
                d = final / f"{name}-{labels}-{kind}"
                report = json.loads((d / "evaluation.json").read_text())
                ev = report["heads"][kind]["evaluation"]
                heads[kind] = {"clean_accuracy": ev["clean_accuracy"],
                               "robust_accuracy": ev["robust_accuracy"],
                               "checks_passed": ev["checks_passed"],
                               "command": evaluate_command(report, kind, d)}
            evaluations[key] = {"threat_model": report["threat_model"], "mode": report["mode"],
                                "data": report["data"], "labels": report["labels"]["count"],
                                "n_test": report["n_test"], "heads": heads}
        run = Path(report["checkpoint"])
        metrics[model] = {"evaluations": evaluations, "training": training_summary(run, name)}
    return metrics


def results_table(metrics: dict) -> str:
    """The README's results table (Markdown) from collected metrics."""
    rows = ["| encoder | labels | head | clean | robust (linf 8/255) |", "|---|---|---|---|---|"]
    for model, m in metrics.items():
        for ev in m["evaluations"].values():
            for kind, h in ev["heads"].items():
                rows.append(f"| {model.upper()} | {ev['labels']:,} | {kind} | "
                            f"{100 * h['clean_accuracy']:.1f} % | "
                            f"{100 * h['robust_accuracy']:.1f} % |")
    return "\n".join(rows)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
