"""results/recheck.py: AutoAttack's targeted pair (torchattacks) as an independent re-check."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("recheck", ROOT / "results" / "recheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear_problem(n: int = 200):
    """A 10-class linear classifier on 3x4x4 images in [0.3, 0.7], so that an eps below 0.3
    never meets the [0, 1] box and robustness has a closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    images = 0.3 + 0.4 * torch.rand(n, 3, 4, 4)
    with torch.no_grad():
        labels = model(images).argmax(1)
        labels[: n // 4] = (labels[: n // 4] + 1) % 10  # a quarter misclassified
    return model, images, labels


def closed_form_robust(model, images, labels, eps: float) -> float:
    """Linear logits: a correct x stays correct in the linf ball of radius eps iff for every
    other class j, (w_y - w_j) x + b_y - b_j > eps * ||w_y - w_j||_1."""
    w = model[1].weight
    with torch.no_grad():
        logits = model(images)
        margin = logits.gather(1, labels[:, None]) - logits  # n x classes
        dual = (w[labels][:, None, :] - w[None]).abs().sum(-1)  # ||w_y - w_j||_1
        worst = (margin - eps * dual).scatter(1, labels[:, None], float("inf")).min(1).values
    return ((logits.argmax(1) == labels) & (worst > 0)).float().mean().item()


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.075, 0.1])
def test_the_cascade_finds_the_closed_form_robust_accuracy_of_a_linear_model(eps):
    model, images, labels = linear_problem()
    result = load_script().recheck(model, images, labels, eps, 10)
    assert result["clean_accuracy"] == pytest.approx(0.75, abs=0.01)
    expected = closed_form_robust(model, images, labels, eps)
    assert result["robust_accuracy"] == pytest.approx(expected, abs=1 / len(labels))
    steps = [a["robust_accuracy"] for a in result["attacks"].values()]
    assert list(result["attacks"]) == ["apgd-t", "fab-t"]
    assert result["clean_accuracy"] >= steps[0] >= steps[1] == result["robust_accuracy"]
    if eps == 0:
        assert result["robust_accuracy"] == result["clean_accuracy"]
    else:
        assert expected < result["clean_accuracy"]  # the budget matters at this eps
