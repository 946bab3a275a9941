"""Figures: valid PNGs, and a loss landscape whose geometry and values are the right ones."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from byorl.training.attacks import ThreatModel, margin_loss
from byorl.training.data import load_images
from byorl.training.figures import loss_landscape, plot_accuracy, plot_landscapes, plot_neighbours
from byorl.training.linear_classifier import Classifier, to_float
from byorl.training.models import create_model


def assert_png(path, min_size=(100, 100)) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert np.asarray(im.convert("L")).std() > 0  # not a blank canvas


@pytest.fixture(scope="module")
def images(image_folder):
    return load_images(str(image_folder), "train", cache_dir=None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    encoder = create_model("preact_resnet_small")
    return Classifier(encoder, nn.Linear(encoder.num_features, 10)).eval()


def test_accuracy_figure(tmp_path):
    rows = [{"method": m, "label_fraction": f, "robust_accuracy": acc * f ** 0.1}
            for m, acc in (("byorl", 0.6), ("uat_ft", 0.4), ("at", 0.3)) for f in (0.01, 0.1, 1)]
    assert_png(plot_accuracy(rows, "robust_accuracy", tmp_path / "fig.png", "l2"))


@pytest.mark.parametrize("threat", [ThreatModel("l2", 0.5), ThreatModel("linf", 8 / 255)])
def test_loss_landscape(model, images, threat, tmp_path):
    x, y = to_float(images.images[:2]), images.labels[:2]
    lands = [loss_landscape(model, x[i], int(y[i]), threat, resolution=9, steps=5)
             for i in range(2)]
    for i, land in enumerate(lands):
        u, v = torch.from_numpy(land["u_direction"]), torch.from_numpy(land["v_direction"])
        with torch.no_grad():
            clean = -margin_loss(model(x[i : i + 1]), y[i : i + 1]).item()
        assert land["margin"].shape == (9, 9)
        assert land["margin"][4, 4] == pytest.approx(clean, abs=1e-5)  # the origin is the image
        assert land["clean_margin"] == pytest.approx(clean, abs=1e-5)
        assert land["pgd_margin"] < clean  # PGD went downhill
        # every traced point of the ball lies exactly on its boundary
        deltas = torch.from_numpy(land["ball"]).float() @ torch.stack([u.flatten(), v.flatten()])
        sizes = deltas.abs().amax(1) if threat.norm == "linf" else deltas.norm(dim=1)
        assert torch.allclose(sizes, torch.full_like(sizes, threat.eps), rtol=1e-4)
        if threat.norm == "l2":  # orthonormal axes: the ball's trace is a circle
            assert (u * v).sum().abs() < 1e-5
            assert np.allclose(np.hypot(*land["ball"].T), threat.eps, rtol=1e-4)
        else:  # Rademacher: every pixel moves by the full step
            assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert_png(plot_landscapes(lands, tmp_path / "land.png", images.classes))


def test_neighbour_grid(images, tmp_path):
    query = to_float(images.images[0])
    rows = [("clean", query, [1, 2, 3]), ("perturbed", query.flip(2), [4, 5, 6])]
    path = plot_neighbours(rows, images.images, images.labels, images.classes,
                           int(images.labels[0]), tmp_path / "grid.png")
    assert_png(path)
