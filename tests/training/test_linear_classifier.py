"""Linear heads: the folded head equals the trained one, robust heads gain robustness on a toy
problem built for it, early stopping keeps the best validation epoch, and the few-label recipe
fits what the paper's literal 50 epochs leave underfitted."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from byorl.training.attacks import ThreatModel
from byorl.training.data import ImageSet, load_images
from byorl.training.evaluate import evaluate_robustness
from byorl.training.linear_classifier import (
    Classifier,
    HeadConfig,
    StandardizedLinear,
    encode,
    fit_linear_head,
    linear_from,
    linear_to_lists,
    select_l2_head,
    shuffled_batches,
    to_float,
)
from byorl.training.models import create_model

ROOT = Path(__file__).resolve().parents[2]
EPS = 0.1  # > the faint class pattern (0.05), << the bright-row gap (0.6)


def toy_problem(n: int, seed: int) -> ImageSet:
    """4 classes in 3x4x4 images. Channel 0: row y is bright (0.8, the rest 0.2), except 10 % of
    the time another row is: robust, right 90 %. Channels 1-2: a faint +-0.05 pattern per class
    plus noise: right ~always, but an eps of 0.1 can paint another class's pattern over it."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (4, 2, 4, 4), generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 4, (n,), generator=gen)
    swap = torch.rand(n, generator=gen) < 0.1
    row = torch.where(swap, (y + torch.randint(1, 4, (n,), generator=gen)) % 4, y)
    x = torch.full((n, 3, 4, 4), 0.2)
    x[:, 0][torch.arange(n), row] = 0.8
    x[:, 1:] = 0.5 + 0.05 * (2 * patterns[y] - 1) + 0.02 * torch.randn(n, 2, 4, 4, generator=gen)
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y, list("abcd"))


def test_folded_head_computes_the_same_logits():
    torch.manual_seed(0)
    f = torch.randn(16, 8) * 3 + 1
    head = StandardizedLinear(f.mean(0), f.std(0), 5)
    torch.testing.assert_close(head.fold()(f), head(f), rtol=1e-5, atol=1e-5)


def test_robust_head_gains_robust_accuracy_over_a_nonrobust_one():
    torch.set_num_threads(1)
    train, val, test = toy_problem(512, 0), toy_problem(128, 1), toy_problem(200, 2)
    encoder = nn.Flatten()  # frozen "encoder": the pixels themselves
    base = dict(norm="linf", eps=EPS, epochs=10, decay_epoch=5, batch_size=64, min_steps=300)
    threat = ThreatModel("linf", EPS)
    results = {}
    for robust in (False, True):
        config = HeadConfig(robust=robust, attack_steps=5, **base)
        head, history = fit_linear_head(encoder, train, val, 4, config)
        assert history["optimizer_steps"] >= 300
        results[robust] = evaluate_robustness(Classifier(encoder, head), test.images,
                                              test.labels, threat, "quick")
    standard, robust = results[False], results[True]
    assert standard["clean_accuracy"] > 0.95  # the faint pattern separates the classes
    assert standard["robust_accuracy"] < 0.3  # ... and the attack repaints it
    assert robust["robust_accuracy"] > 0.75  # the bright row survives eps = 0.1
    assert robust["robust_accuracy"] > standard["robust_accuracy"] + 0.45


def test_early_stopping_keeps_the_best_validation_epoch():
    """64 training images with 40 % wrong labels and 192 noisy pixels: the head first learns the
    signal, then memorises the noise, so validation accuracy peaks before the end."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(3, 3, 8, 8, generator=gen)

    def noisy(n: int, flip: float) -> ImageSet:
        y = torch.randint(0, 3, (n,), generator=gen)
        x = (0.5 + 0.04 * direction[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1)
        wrong = torch.rand(n, generator=gen) < flip
        y = torch.where(wrong, (y + torch.randint(1, 3, (n,), generator=gen)) % 3, y)
        return ImageSet((x * 255).round().to(torch.uint8), y, list("abc"))

    train, val = noisy(64, 0.4), noisy(512, 0.0)
    config = HeadConfig(epochs=30, decay_epoch=20, batch_size=16, min_steps=600)
    head, history = fit_linear_head(nn.Flatten(), train, val, 3, config)
    val_acc = history["val_acc"]
    best = max(val_acc)
    assert history["best_epoch"] == val_acc.index(best)  # the first epoch reaching the best
    assert val_acc[-1] < best  # overfitting happened, so the choice mattered
    with torch.no_grad():
        acc = (head(encode(nn.Flatten(), val.images)).argmax(1) == val.labels).float().mean()
    assert acc.item() == pytest.approx(best)  # the returned head is that epoch's head
    assert history["lr"][:20] == [2e-3] * 20 and history["lr"][20:] == [2e-4] * 10


def test_few_labels_get_enough_optimiser_steps(cifar_sample):
    """500 labels: the paper's literal 50 epochs at batch 256 are 100 Adam steps; the default
    recipe repeats the labeled set within each epoch up to >= 2000 steps and fits it."""
    torch.set_num_threads(1)
    images = load_images(str(cifar_sample), "test", cache_dir=ROOT / ".cache" / "tests")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train = images.subset(perm[:500])
    torch.manual_seed(0)
    encoder = create_model("preact_resnet_small").eval()
    _, recipe = fit_linear_head(encoder, train, None, 10, HeadConfig())
    _, literal = fit_linear_head(encoder, train, None, 10, HeadConfig(batch_size=256, min_steps=0))
    assert literal["optimizer_steps"] == 50 * -(-len(train) // 256)
    assert recipe["optimizer_steps"] >= 2000
    assert recipe["best_epoch"] == 49  # no validation set: the last epoch
    assert recipe["train_acc"][-1] > 0.9
    assert recipe["train_acc"][-1] > literal["train_acc"][-1] + 0.2


def test_fixed_steps_per_epoch_stream_whole_shuffled_passes():
    """steps_per_epoch caps the work (robust heads on all labels); the batches still come from
    whole shuffled passes, so every labeled image is used once before any is used twice."""
    batches = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    first_pass = torch.cat([next(batches) for _ in range(3)])  # 4 + 4 + 2
    assert sorted(first_pass.tolist()) == list(range(10))
    train = toy_problem(100, 0)
    config = HeadConfig(epochs=3, decay_epoch=2, batch_size=16, steps_per_epoch=5)
    _, history = fit_linear_head(nn.Flatten(), train, None, 4, config)
    assert history["optimizer_steps"] == 15 and history["steps_per_epoch"] == 5
    with pytest.raises(ValueError, match="steps_per_epoch"):
        HeadConfig(steps_per_epoch=-1)


def test_l2_penalty_shrinks_the_head_toward_zero():
    train, val = toy_problem(256, 0), toy_problem(64, 1)
    base = dict(epochs=4, decay_epoch=2, batch_size=64, min_steps=200)
    norms = [fit_linear_head(nn.Flatten(), train, val, 4, HeadConfig(l2=l2, **base))[0]
             .weight.norm().item() for l2 in (0.0, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 0.2 * norms[0]  # a dominating penalty leaves little of W


def test_select_l2_head_keeps_the_best_validation_score_and_never_sees_test_data():
    torch.set_num_threads(1)
    train, val = toy_problem(256, 0), toy_problem(64, 1)
    config = HeadConfig(norm="linf", eps=EPS, attack_steps=3, epochs=4, decay_epoch=2,
                        batch_size=64, min_steps=200)
    head, history = select_l2_head(nn.Flatten(), train, val, 4, config, grid=(0.0, 0.1, 10.0))
    table = history["l2_grid"]
    assert [r["l2"] for r in table] == [0.0, 0.1, 10.0]
    scores = [r["val_clean"] + r["val_robust"] for r in table]
    assert history["l2"] == table[scores.index(max(scores))]["l2"]  # first of the best
    for r in table:
        assert 0 <= r["val_robust"] <= r["val_clean"] <= 1
    # the kept head is exactly the one fitted with the chosen strength
    again, _ = fit_linear_head(nn.Flatten(), train, val, 4, config.updated(l2=history["l2"]))
    torch.testing.assert_close(head.weight, again.weight)
    with pytest.raises(ValueError, match="validation"):
        select_l2_head(nn.Flatten(), train, toy_problem(0, 2), 4, config)


def test_saved_head_lists_round_trip_exactly():
    head = nn.Linear(7, 3)
    again = linear_from(**linear_to_lists(head))
    torch.testing.assert_close(again.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(again.bias, head.bias, rtol=0, atol=0)


def test_robust_head_attacks_through_the_frozen_encoder_in_eval_mode():
    """Every pass of the robust head's PGD goes through the encoder (input gradients flow
    through it) in eval mode, so BatchNorm uses and keeps its running statistics; the encoder
    leaves bit-identical and without gradients, and the attacked pixels stay in the budget."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    with torch.no_grad():  # running statistics far from any batch's: a train-mode pass shows
        encoder[1].running_mean.fill_(3.0)
        encoder[1].running_var.fill_(0.01)
    before = copy.deepcopy(encoder.state_dict())
    passes = []
    encoder.register_forward_hook(
        lambda m, inputs, out: passes.append((m.training, inputs[0].requires_grad, inputs[0])))
    train = toy_problem(64, 0)
    clean = to_float(train.images)
    config = HeadConfig(robust=True, norm="linf", eps=EPS, attack_steps=3, epochs=1,
                        batch_size=16, steps_per_epoch=2)
    fit_linear_head(encoder, train, None, 4, config)
    assert all(not training for training, _, _ in passes)
    attack_passes = [x for _, grad, x in passes if grad]
    assert len(attack_passes) == 2 * 3  # 2 batches, 3 PGD steps each
    # linf distance of each attacked image to the nearest clean one: within eps, not zero
    gaps = torch.cat([(x[:, None] - clean[None]).flatten(2).abs().amax(2).amin(1)
                      for x in attack_passes])
    assert gaps.max() <= EPS + 1e-6 and gaps.min() > 0
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in encoder.parameters())
