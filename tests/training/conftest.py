"""What the attack and evaluation tests share: small models trained here in seconds on the
shipped CIFAR-10 sample (a linear classifier on raw pixels, whose exact worst case under an linf
budget has a closed form, and a tiny ReLU conv net), and a synthetic linear problem."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from byorl.training.data import load_images
from byorl.training.linear_classifier import to_float

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(cifar_sample):
    """(train x, train y, test x, test y): the shipped CIFAR-10 test images, 2000 to train on,
    100 to attack."""
    torch.set_num_threads(1)
    images = load_images(str(cifar_sample), "test", cache_dir=ROOT / ".cache" / "tests")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_test = 100
    train, test = perm[n_test : n_test + 2000], perm[:n_test]
    x = to_float(images.images)
    return x[train], images.labels[train], x[test], images.labels[test]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def linear(data):
    torch.manual_seed(0)
    return fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), data[0], data[1])


@pytest.fixture(scope="module")
def convnet(data):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return fit(net, data[0], data[1], steps=300)


def exact_linf_robust(linear: nn.Sequential, x, y, eps) -> torch.Tensor:
    """Per example: robust to every x' in the linf ball and [0, 1]? For logits Wx + b the best
    move toward class t is coordinate-wise: each pixel goes eps toward sign(w_t - w_y), clipped
    to [0, 1]; the point is robust iff no target t then overtakes y."""
    w, b = linear[1].weight.detach(), linear[1].bias.detach()
    flat = x.flatten(1)
    robust = (flat @ w.T + b).argmax(1) == y
    for t in range(w.shape[0]):
        c = w[t] - w[y]  # (N, D)
        delta = (flat + eps * c.sign()).clamp(0, 1) - flat
        gain = ((flat + delta) * c).sum(1) + b[t] - b[y]
        robust &= (gain <= 0) | (t == y)
    return robust


def synthetic_linear(n: int = 48, seed: int = 0, size: int = 4):
    """A random linear classifier on 3 x size x size images (4 classes) and images labelled by
    it, a few relabelled wrongly: the suite's bookkeeping in seconds, with an exact worst case."""
    gen = torch.Generator().manual_seed(seed)
    d = 3 * size * size
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, d, generator=gen))
        model[1].bias.zero_()
    x = torch.rand(n, 3, size, size, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 4
    return model.eval(), x, y


def interior_linear(margin: float = 0.25, **kw):
    """`synthetic_linear`'s classifier and labels with its images squeezed into
    [margin, 1 - margin] (a bias of -margin * W 1 keeps every logit's argmax, so the labels
    still hold): an l2 perturbation of norm <= margin then never meets the [0, 1] box, and the
    exact l2 worst case is the closed form of `l2_distance_to_boundary`."""
    model, x, y = synthetic_linear(**kw)
    with torch.no_grad():
        model[1].bias.copy_(-margin * model[1].weight.sum(1))
    return model, margin + (1 - 2 * margin) * x, y


def l2_distance_to_boundary(linear: nn.Sequential, x, y) -> torch.Tensor:
    """Per example, the smallest l2 perturbation that makes a linear classifier Wx + b answer
    another class: min over t != y of (z_y - z_t) / ||w_y - w_t||, negative when it is already
    wrong. Exact when the [0, 1] box does not bind (see `interior_linear`); robust at eps iff
    this exceeds eps."""
    w, b = linear[1].weight.detach(), linear[1].bias.detach()
    z = x.flatten(1) @ w.T + b
    margins = z.gather(1, y[:, None]) - z  # (N, classes)
    dist = margins / (w[y][:, None, :] - w[None]).norm(dim=2)
    return dist.scatter(1, y[:, None], torch.inf).amin(1)
