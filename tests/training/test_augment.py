import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from byorl.training import augment as A
from byorl.training.config import AugmentConfig


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(6, 3, 16, 16)


@pytest.mark.parametrize(
    ("ours", "theirs", "lo", "hi"),
    [
        (A.adjust_brightness, TF.adjust_brightness, 0.5, 1.5),
        (A.adjust_contrast, TF.adjust_contrast, 0.5, 1.5),
        (A.adjust_saturation, TF.adjust_saturation, 0.5, 1.5),
        (A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_match_torchvision_per_image(images, ours, theirs, lo, hi):
    f = torch.linspace(lo, hi, len(images))
    batched = ours(images, f)
    reference = torch.stack([theirs(im, float(fi)) for im, fi in zip(images, f, strict=True)])
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)


def test_grayscale_matches_torchvision(images):
    torch.testing.assert_close(A.grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)


def test_full_crop_is_identity_and_flip_mirrors(images):
    same = A.random_resized_crop_flip(images, scale=(1, 1), ratio=(1, 1), flip_p=0.0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    mirrored = A.random_resized_crop_flip(images, scale=(1, 1), ratio=(1, 1), flip_p=1.0)
    torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-5, rtol=0)


def test_views_are_valid_and_differ_per_image(images):
    torch.manual_seed(1)
    v1, v2 = A.augment(images, AugmentConfig()), A.augment(images, AugmentConfig())
    assert v1.shape == images.shape and torch.isfinite(v1).all()
    assert v1.min() >= 0 and v1.max() <= 1
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 1e-3  # every image got its own draw


def test_no_colour_change_at_zero_strength(images):
    torch.manual_seed(2)
    torch.testing.assert_close(A.color_jitter(images, strength=0.0, p=1.0), images)
    assert torch.equal(A.random_grayscale(images, p=0.0), images)
