"""The Markdown tables: what a reader of evaluation.md and results.md sees."""

from byorl.training.reports import percent, report_markdown, results_markdown, threat_label


def test_percent_and_threat_label_print_as_the_paper_does():
    assert percent(0.4567) == "45.67%" and percent(1.0) == "100.00%"
    assert threat_label("linf", 8 / 255) == "ℓ∞, ε = 8/255"
    assert threat_label("l2", 0.5) == "ℓ2, ε = 0.5"  # not a whole number of 255ths
    assert threat_label("l2", 2.0) == "ℓ2, ε = 2"


def _row(method, fraction, robust, head=""):
    return {"method": method, "head": head, "norm": "linf", "eps": 8 / 255,
            "label_fraction": fraction, "robust_accuracy": robust, "clean_accuracy": 0.9,
            "eval_mode": "quick", "eval_images": 100}


def test_results_table_has_one_row_per_series_and_leaves_missing_cells_empty():
    rows = [_row("byorl", 0.01, 0.4, "robust"), _row("byorl", 1.0, 0.5, "robust"),
            _row("at", 1.0, 0.45)]
    lines = results_markdown(rows).splitlines()
    assert lines[0] == "## ℓ∞, ε = 8/255"
    assert "evaluation: quick suite on 100 test images." in lines[2]
    assert "| method | 1% labels | 100% labels |" in lines
    assert "| byorl (robust head) | 40.00% (90.00%) | 50.00% (90.00%) |" in lines
    assert "| at |  | 45.00% (90.00%) |" in lines


def _evaluation(passed: bool) -> dict:
    ladder = [{"eps": 0.0, "robust_accuracy": 0.9}, {"eps": 8 / 255, "robust_accuracy": 0.3}]
    return {"clean_accuracy": 0.9, "robust_accuracy": 0.25,
            "attacks": [{"name": "apgd-ce", "settings": {"steps": 20, "library": "torchattacks"},
                         "fooled": 65, "robust_accuracy": 0.25, "seconds": 1.25}],
            "checks": {"non_increasing_in_eps": {"passed": True, "ladder": ladder},
                       "nonzero_gradients": {"passed": passed}}}


def test_evaluation_report_summarises_each_head_and_names_failed_checks():
    head = {"config": {"epochs": 50}, "evaluation": _evaluation(False),
            "history": {"best_epoch": 7, "val_metric": "clean accuracy", "best_val_acc": 0.8,
                        "optimizer_steps": 2000}}
    report = {"checkpoint": "runs/r", "encoder": {"arch": "preact_resnet18", "width": 1},
              "encoder_attack": {"method": "apgd", "norm": "linf", "eps": 8 / 255},
              "labels": {"count": 500, "seed": 0, "val_size": 1024}, "data": "cifar10",
              "n_test": 100, "threat_model": {"norm": "linf", "eps": 8 / 255}, "mode": "quick",
              "heads": {"nonrobust": head}}
    text = report_markdown(report)
    assert "Attack suite, **quick mode**: apgd-ce (steps 20)." in text  # library left out
    assert "| nonrobust | 90.00% | 25.00% | FAILED: nonzero_gradients |" in text
    assert "Best validation epoch 7 of 50 (clean accuracy 80.00%), 2000 optimiser steps." in text
    assert "| apgd-ce | 65 | 25.00% | 1.2 |" in text
    assert "| nonzero_gradients | **no** |" in text
    assert text.endswith("Robust accuracy over eps (probe: APGD-CE): 0: 90.00%, 0.03137: 30.00%.\n")
