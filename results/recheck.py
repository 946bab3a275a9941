"""Re-attack finished cells with attacks the project's suite does not run: the two of
AutoAttack's standard version it lacks, APGD-T (targeted DLR, 9 target classes x 100 steps) and
FAB-T (minimum-norm, 9 target classes x 100 steps), both from torchattacks, on the cell's own
test images, encoder and fitted head (W and b, stored in the cell).

    python results/recheck.py results/cpu-default-v2/cells/*.json

Each cell gets CELLS/../recheck/NAME.json: clean accuracy (which must equal the cell's: the same
images and head), robust accuracy after APGD-T and after FAB-T on what APGD-T left, and the
cell's own number beside them. A re-check below the cell's number means the suite missed points
(each attack here starts from the clean images, not from the suite's survivors); where the cell
lists the test images that survived its suite (`robust_indices`, cells evaluated since session
14), the per-example worst case of both is reported too.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torchattacks

from byorl.training.checkpoint import load_encoder
from byorl.training.data import load_images
from byorl.training.evaluate import attack_robust, library_attack, predict
from byorl.training.linear_classifier import Classifier, linear_from

BATCH = 250


def attacks(num_classes: int) -> dict:
    """AutoAttack's targeted pair at its standard settings (1 restart, 100 steps each)."""
    return {
        "apgd-t": library_attack(torchattacks.APGDT, steps=100, n_restarts=1,
                                 n_classes=num_classes),
        "fab-t": library_attack(torchattacks.FAB, steps=100, n_restarts=1, multi_targeted=True,
                                n_classes=num_classes),
    }


def recheck(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
            num_classes: int) -> dict:
    """Robust accuracy of `model` on images in [0, 1] after each attack in turn, each attacking
    only the points every earlier one left correct (AutoAttack's cascade: the last number is the
    per-example worst case). The suite's own batching and budget check (within eps in linf,
    pixels in [0, 1]) run each attack; only the attacks differ."""
    robust = predict(model, images, BATCH) == labels
    out = {"n": len(labels), "clean_accuracy": robust.float().mean().item(), "attacks": {}}
    for name, attack in attacks(num_classes).items():
        start = time.perf_counter()
        attack_robust(model, attack, images, labels, robust, "linf", eps, BATCH)
        out["attacks"][name] = {"robust_accuracy": robust.float().mean().item(),
                                "seconds": round(time.perf_counter() - start, 1)}
    out["robust_accuracy"] = robust.float().mean().item()
    out["robust_indices"] = robust.nonzero().flatten().tolist()
    return out


def recheck_cell(path: Path) -> dict:
    """The cell's classifier on the cell's test images (the experiment's seeded subset)."""
    cell = json.loads(path.read_text())
    settings, row = cell["settings"], cell["row"]
    encoder, _ = load_encoder(settings["encoder"]["path"])
    model = Classifier(encoder, linear_from(**cell["linear"])).eval()
    test = load_images(settings["data"], "test", settings["image_size"]).random_subset(
        settings["eval_size"], settings["seed"])
    result = recheck(model, test.images.float() / 255, test.labels, row["eps"],
                     len(test.classes))
    if abs(result["clean_accuracy"] - row["clean_accuracy"]) > 1e-6:
        raise ValueError(f"{path}: clean accuracy {result['clean_accuracy']} is not the cell's "
                         f"{row['clean_accuracy']}: other images or another head")
    out = {"cell": str(path), "suite_robust_accuracy": row["robust_accuracy"], **result}
    if "robust_indices" in cell["evaluation"]:  # cells evaluated since session 14
        both = set(result["robust_indices"]) & set(cell["evaluation"]["robust_indices"])
        out["robust_accuracy_with_suite"] = len(both) / result["n"]
    return out


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    for path in map(Path, paths):
        out = path.parent.parent / "recheck" / path.name
        if out.exists():
            continue
        result = recheck_cell(path)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{path.stem}: clean {result['clean_accuracy']:.1%}, suite "
              f"{result['suite_robust_accuracy']:.1%}, " + ", ".join(
                  f"{k} {v['robust_accuracy']:.1%}" for k, v in result["attacks"].items())
              + " (cascade)")


if __name__ == "__main__":
    main(sys.argv[1:])
