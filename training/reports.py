"""The Markdown tables of results: `byorl evaluate`'s evaluation.md and `byorl experiment`'s
results.md (their writers keep the JSON, CSV and figures beside them)."""


def percent(x: float) -> str:
    """0.4567 -> '45.67%': accuracies as the tables print them."""
    return f"{100 * x:.2f}%"


def threat_label(norm: str, eps: float) -> str:
    """'ℓ∞, ε = 8/255' when eps < 1 is a whole number of 255ths, else the decimal."""
    steps = eps * 255
    value = f"{round(steps)}/255" if eps < 1 and abs(steps - round(steps)) < 1e-6 else f"{eps:g}"
    return f"{'ℓ∞' if norm == 'linf' else 'ℓ2'}, ε = {value}"


def report_markdown(report: dict) -> str:
    """The evaluation as Markdown tables: a summary, then per head its attacks and checks."""
    t, lab, enc = report["threat_model"], report["labels"], report["encoder"]
    attacks = next(iter(report["heads"].values()))["evaluation"]["attacks"]
    suite_text = ", ".join(
        f"{a['name']} ({', '.join(f'{k} {v}' for k, v in a['settings'].items() if k != 'library')})"
        for a in attacks
    )
    lines = [
        f"# Robustness evaluation: {report['checkpoint']}", "",
        f"Encoder {enc['arch']} x{enc['width']} (trained with {report['encoder_attack']['method']}"
        f" {report['encoder_attack']['norm']} eps {report['encoder_attack']['eps']:.4g}); "
        f"linear heads on {lab['count']} labels of {report['data']} (seed {lab['seed']}, early "
        f"stopping on {lab['val_size']} validation images); {report['n_test']} test images.", "",
        f"Threat model: {t['norm']}, eps = {t['eps']:.4g} ({t['eps'] * 255:.3g}/255). "
        f"Attack suite, **{report['mode']} mode**: {suite_text}.", "",
        "| head | clean accuracy | robust accuracy | sanity checks |", "|---|---|---|---|",
    ]
    for kind, h in report["heads"].items():
        ev = h["evaluation"]
        failed = [k for k, c in ev["checks"].items() if not c["passed"]]
        lines.append(f"| {kind} | {percent(ev['clean_accuracy'])} | "
                     f"{percent(ev['robust_accuracy'])} "
                     f"| {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} |")
    for kind, h in report["heads"].items():
        ev = h["evaluation"]
        lines += ["", f"## {kind} head", "",
                  f"Best validation epoch {h['history']['best_epoch']} of {h['config']['epochs']}"
                  f" ({h['history']['val_metric']} {percent(h['history']['best_val_acc'])}), "
                  f"{h['history']['optimizer_steps']} optimiser steps.", "",
                  "| attack | fooled | robust accuracy after | seconds |", "|---|---|---|---|"]
        lines += [f"| {a['name']} | {a['fooled']} | {percent(a['robust_accuracy'])} | "
                  f"{a['seconds']:.1f} |" for a in ev["attacks"]]
        lines += ["", "| sanity check | passed |", "|---|---|"]
        lines += [f"| {k} | {'yes' if c['passed'] else '**no**'} |"
                  for k, c in ev["checks"].items()]
        ladder = ev["checks"]["non_increasing_in_eps"]["ladder"]
        lines += ["", "Robust accuracy over eps (probe: APGD-CE): " + ", ".join(
            f"{r['eps']:.4g}: {percent(r['robust_accuracy'])}" for r in ladder) + "."]
    return "\n".join(lines) + "\n"


def series_name(row: dict) -> str:
    """'byorl (l2 head)' for a head on an encoder, the method alone for a baseline."""
    return f"{row['method']} ({row['head']} head)" if row.get("head") else row["method"]


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
        for name in dict.fromkeys(series_name(r) for r in part):
            cells = {r["label_fraction"]: r for r in part if series_name(r) == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{percent(c['robust_accuracy'])} ({percent(c['clean_accuracy'])})"
                if (c := cells.get(f)) else "" for f in fractions) + " |")
        lines.append("")
    return "\n".join(lines)
