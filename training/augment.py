"""Batched SimCLR/BYOL augmentations for 32x32 images (appendix A), run on the training device.

Every image of the batch draws its own parameters; no blur or solarisation at 32x32.
Inputs and outputs are float pixels in [0, 1], shape (N, 3, H, W).
"""

import math

import torch
from torch.nn import functional as F

from byorl.training.config import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # as torchvision's rgb_to_grayscale


def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def random_resized_crop_flip(
    x: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5
) -> torch.Tensor:
    """Crop a random patch of each image (area fraction in `scale`, aspect in `ratio`), resize it
    back to the input size bilinearly, and mirror it with probability flip_p, in one grid_sample."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *scale, dev)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), dev))
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the side length
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f * a + (1 - f) * b, clipped, with one factor per image (torchvision's _blend)."""
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack(
        (
            torch.stack((v, q, p, p, t, v), 1),
            torch.stack((t, v, v, q, p, p), 1),
            torch.stack((p, p, t, v, v, q), 1),
        ),
        1,
    )  # (N, 3, 6, H, W): the rgb value for each hue sector
    return table.gather(2, i.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)).squeeze(2)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by f (a fraction of a turn, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, strength: float, p: float) -> torch.Tensor:
    """SimCLR colour distortion: brightness, contrast, saturation, hue in a random order
    (one order per batch), each image with its own factors, applied with probability p."""
    n, dev = x.shape[0], x.device
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    ops = [
        lambda t: adjust_brightness(t, _uniform(n, max(0.0, 1 - b), 1 + b, dev)),
        lambda t: adjust_contrast(t, _uniform(n, max(0.0, 1 - c), 1 + c, dev)),
        lambda t: adjust_saturation(t, _uniform(n, max(0.0, 1 - s), 1 + s, dev)),
        lambda t: adjust_hue(t, _uniform(n, -h, h, dev)),
    ]
    out = x
    for k in torch.randperm(4).tolist():
        out = ops[k](out)
    keep = (torch.rand(n, device=dev) < p).view(-1, 1, 1, 1)
    return torch.where(keep, out, x)


def random_grayscale(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(keep, grayscale(x).expand_as(x), x)


def augment(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """One random view of each image of the batch."""
    x = random_resized_crop_flip(x, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p)
    x = color_jitter(x, cfg.color_strength, cfg.jitter_p)
    return random_grayscale(x, cfg.gray_p)
