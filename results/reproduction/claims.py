"""The study's cells arranged by the paper's four claims: claims.md beside the cells.

    python results/reproduction/claims.py results/reproduction

Reads the finished cells (cells/*.json, written by `byorl experiment`), so it can be rerun at any
point of the study; cells not finished yet show as blank. The verdicts are in README.md, written
by hand from these tables.
"""

import json
import sys
from pathlib import Path

HEADS = ("nonrobust", "l2", "robust")
ATTACK_ENCODERS = ("byorl-pgd1", "byorl-pgd3", "byorl-apgd5")  # claim 4, weakest first


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def load_cells(study: Path) -> dict:
    """(method, head, labels) -> cell, for every finished cell."""
    cells = {}
    for path in sorted((study / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        row = cell["row"]
        cells[row["method"], row["head"], row["num_labels"]] = cell
    return cells


def acc(cell: dict | None, key: str) -> float | None:
    return None if cell is None else cell["row"][key]


def cell_text(cell: dict | None) -> str:
    """'robust (clean)' in percent, with a mark when a sanity check failed."""
    if cell is None:
        return ""
    mark = "" if cell["row"]["checks_passed"] else " ⚠"
    return f"{pct(acc(cell, 'robust_accuracy'))} ({pct(acc(cell, 'clean_accuracy'))}){mark}"


def masking_signs(cell: dict) -> str:
    """The suite's gradient-masking checks that failed, or 'none'."""
    checks = cell["evaluation"]["checks"]
    failed = [name for name, c in checks.items() if not c["passed"]]
    square = checks["square_not_better_than_whitebox"]
    gap = square["whitebox"] - square["with_square"]
    return (", ".join(failed) or "none") + f"; Square fooled {pct(gap)} pts more"


def claims_markdown(cells: dict) -> str:
    amounts = sorted({k[2] for k in cells})
    head_cols = " | ".join(f"{h} head" for h in HEADS)
    lines = ["# The four claims, cell by cell", "",
             "Robust accuracy (clean accuracy in brackets), % of the evaluated test images, "
             "linf 8/255, full suite; ⚠ marks a failed sanity check.", ""]

    lines += ["## Claim 1: BYOL representations are not robust, even with an adversarial head",
              "", f"| encoder | labels | {head_cols} |", "|---|---|---|---|---|"]
    for method in ("byol", "byorl-pgd3"):
        for n in amounts:
            lines.append(f"| {method} | {n} | " + " | ".join(
                cell_text(cells.get((method, h, n))) for h in HEADS) + " |")

    lines += ["", "## Claim 2: on BYORL, a non-robust head is within a few points of a robust one",
              "", "| encoder | labels | nonrobust | l2 | robust | robust - nonrobust | "
              "robust - l2 |", "|---|---|---|---|---|---|---|"]
    for method in ATTACK_ENCODERS:
        for n in amounts:
            c = {h: cells.get((method, h, n)) for h in HEADS}
            r = {h: acc(c[h], "robust_accuracy") for h in HEADS}
            gaps = [pct(r["robust"] - r[h]) if r["robust"] is not None and r[h] is not None
                    else "" for h in ("nonrobust", "l2")]
            lines.append(f"| {method} | {n} | " + " | ".join(cell_text(c[h]) for h in HEADS)
                         + f" | {gaps[0]} | {gaps[1]} |")

    lines += ["", "## Claim 3: with few labels BYORL beats AT and UAT-FT; with all labels the gap "
              "closes", "", "| method | " + " | ".join(f"{n} labels" for n in amounts) + " |",
              "|---" * (len(amounts) + 1) + "|"]
    methods = [(m, h) for m in ATTACK_ENCODERS for h in HEADS] + [("at", ""), ("uat_ft", "")]
    for method, head in methods:
        if any((method, head, n) in cells for n in amounts):
            name = f"{method} ({head} head)" if head else method
            lines.append(f"| {name} | " + " | ".join(
                cell_text(cells.get((method, head, n))) for n in amounts) + " |")

    lines += ["", "## Claim 4: stronger inner attacks give more robust representations; few "
              "fixed steps can mask gradients", "",
              "| encoder (inner attack) | labels | head | robust (clean) | failed checks; "
              "Square's extra |", "|---|---|---|---|---|"]
    for method in ATTACK_ENCODERS:
        for n in amounts:
            for h in HEADS:
                if (cell := cells.get((method, h, n))) is not None:
                    lines.append(f"| {method} | {n} | {h} | {cell_text(cell)} | "
                                 f"{masking_signs(cell)} |")

    lines += ["", "## Heads: the L2 strength chosen on the held-out images", "",
              "| encoder | labels | chosen L2 | validation clean / PGD robust per L2 |",
              "|---|---|---|---|"]
    for (method, head, n), cell in sorted(cells.items()):
        if head == "l2":
            grid = ", ".join(f"{g['l2']:g}: {pct(g['val_clean'])}/{pct(g['val_robust'])}"
                             for g in cell["training"]["l2_grid"])
            lines.append(f"| {method} | {n} | {cell['training']['l2']:g} | {grid} |")

    lines += ["", "## Time per cell (2-core CPU)", "",
              "Summed over the sessions that resumed a cell; * marks a cell resumed before the "
              "head's fitting time was recorded (its minutes are the suite's alone).", "",
              "| cell | minutes | of which attack suite |", "|---|---|---|"]
    for (method, head, n), cell in sorted(cells.items()):
        name = f"{method} {head} {n}".replace("  ", " ")
        total, suite = cell["row"]["seconds"], cell["evaluation"]["seconds"]
        mark = "*" if suite > total else ""
        lines.append(f"| {name} | {max(total, suite) / 60:.1f}{mark} | {suite / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "results/reproduction")
    text = claims_markdown(load_cells(study))
    (study / "claims.md").write_text(text)
    print(text)
