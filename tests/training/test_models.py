import pytest
import torch

from byorl.training.models import create_model, list_models


@pytest.mark.parametrize(("name", "width", "dim"), [
    ("preact_resnet_tiny", 1, 64), ("preact_resnet_small", 1, 256),
    ("preact_resnet18", 1, 512), ("preact_resnet34", 2, 1024)])
def test_registry_builds_encoders(name, width, dim):
    model = create_model(name, width=width).eval()
    with torch.no_grad():
        h = model.forward_features(torch.rand(2, 3, 32, 32))
    assert model.num_features == dim and h.shape == (2, dim) and torch.isfinite(h).all()


def test_normalisation_is_inside_the_model():
    model = create_model("preact_resnet_tiny").eval()
    assert model.mean.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(model(x), model((x - model.mean) / model.std))


def test_unknown_model_is_refused():
    assert "preact_resnet34" in list_models()
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")
