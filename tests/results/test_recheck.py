"""results/recheck.py: AutoAttack's targeted pair (torchattacks) as an independent re-check."""

import pytest

from tests.results.conftest import load_script
from tests.training.conftest import exact_linf_robust, synthetic_linear


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.04, 0.08])
def test_the_cascade_finds_the_exact_robust_points_of_a_linear_model(eps):
    """A linear classifier's worst case in the linf ball and [0, 1] has a closed form: the
    re-check finds exactly the points it leaves robust, attack by attack never gaining any."""
    model, x, y = synthetic_linear(n=64)
    exact = exact_linf_robust(model, x, y, eps)
    result = load_script("recheck").recheck(model, x, y, eps, 4)
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert result["n"] == 64 and result["clean_accuracy"] == pytest.approx(clean)
    assert result["robust_indices"] == exact.nonzero().flatten().tolist()
    assert result["robust_accuracy"] == pytest.approx(exact.float().mean().item())
    steps = [a["robust_accuracy"] for a in result["attacks"].values()]
    assert list(result["attacks"]) == ["apgd-t", "fab-t"]
    assert result["clean_accuracy"] >= steps[0] >= steps[1] == result["robust_accuracy"]
    if eps == 0:
        assert result["robust_accuracy"] == result["clean_accuracy"]
