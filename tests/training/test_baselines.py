"""Baselines on a toy problem built so that robustness and accuracy disagree (Tsipras et al.):
the top/bottom brightness of an image agrees with its label 70 % of the time and survives the
attack; a faint green tint agrees always but the attack can flip it. Standard training learns
the tint (100 % clean, ~0 % robust); adversarial training has to use the brightness (~70 %).
"""

import pytest
import torch

from byorl.training.attacks import ThreatModel
from byorl.training.baselines import (
    BaselineConfig,
    accuracy,
    new_classifier,
    train_classifier,
    uat_ft,
)
from byorl.training.data import ImageSet

THREAT = ThreatModel("linf", 0.05)  # > the tint (0.03), << the brightness gap (0.4)
# teacher_steps: 30 left the teacher at its first rise (58 % pseudo-labels right), 60 fits it
CONFIG = BaselineConfig(arch="preact_resnet_small", width=1, steps=40, teacher_steps=60,
                        batch_size=32, lr=0.05, attack_steps=3, eval_every=10, eval_attack_steps=5)


def toy_problem(n: int, seed: int, p_robust: float = 0.7, size: int = 8) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    sign = (2 * y - 1).float().view(-1, 1, 1, 1)
    agree = (torch.rand(n, generator=gen) < p_robust).float().view(-1, 1, 1, 1)
    robust = sign * (2 * agree - 1)
    x = torch.full((n, 3, size, size), 0.5)
    x[:, :, : size // 2] += 0.2 * robust
    x[:, :, size // 2 :] -= 0.2 * robust
    x[:, 1:2] += 0.03 * sign
    x += 0.01 * torch.randn(x.shape, generator=gen)
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y, ["down", "up"])


@pytest.fixture(scope="module")
def data():
    return {"train": toy_problem(512, 0), "val": toy_problem(128, 1), "test": toy_problem(256, 2)}


@pytest.fixture(scope="module")
def standard(data):
    torch.set_num_threads(1)
    return train_classifier(data["train"], data["val"], 2, CONFIG)


@pytest.fixture(scope="module")
def adversarial(data):
    return train_classifier(data["train"], data["val"], 2, CONFIG, THREAT)


def test_adversarial_training_beats_standard_training_under_attack(data, standard, adversarial):
    test = data["test"]
    std_clean, std_robust = accuracy(standard[0], test), accuracy(standard[0], test, THREAT, 10)
    at_robust = accuracy(adversarial[0], test, THREAT, 10)
    assert std_clean > 0.95  # the tint separates the classes perfectly
    assert std_robust < 0.2  # ... and the attack flips it
    assert at_robust > 0.6  # the brightness is right 70 % of the time, whatever the attack
    assert at_robust > std_robust + 0.4


def test_training_takes_the_configured_steps(standard, adversarial):
    for model, history in (standard, adversarial):
        assert history["step"] == [10, 20, 30, 40]
        torch.manual_seed(CONFIG.seed)
        init = new_classifier(CONFIG.arch, CONFIG.width, 2)  # the same seeded initialisation
        assert not torch.equal(init.head.weight, model.head.weight)
    assert adversarial[1]["val_metric"] == "robust accuracy (PGD)"
    assert standard[1]["val_metric"] == "clean accuracy"


def test_early_stopping_keeps_the_best_validation_check(data, standard):
    model, history = standard
    best = max(range(len(history["val_acc"])), key=history["val_acc"].__getitem__)
    assert history["best_step"] == history["step"][best]  # the first of equal bests
    assert history["best_val_acc"] == max(history["val_acc"])
    assert accuracy(model, data["val"]) == history["best_val_acc"]  # those weights came back


def test_uat_ft_pseudo_labels_then_trains_robustly(data, standard):
    train, labeled_count = data["train"], 64
    labeled = train.subset(torch.arange(labeled_count))
    unlabeled = train.images[labeled_count:]
    model, history = uat_ft(labeled, unlabeled, data["val"], 2, THREAT, CONFIG)
    truth = train.labels[labeled_count:]
    assert len(history["pseudo_labels"]) == len(unlabeled)
    assert (history["pseudo_labels"] == truth).float().mean() > 0.8  # beyond brightness alone
    assert history["teacher"]["val_metric"] == "clean accuracy"
    assert history["student"]["val_metric"] == "robust accuracy (PGD)"
    uat_robust = accuracy(model, data["test"], THREAT, 10)
    assert uat_robust > accuracy(standard[0], data["test"], THREAT, 10) + 0.4


def test_uat_ft_with_every_label_is_adversarial_training(data):
    config = BaselineConfig(arch="preact_resnet_small", width=1, steps=2, batch_size=16,
                            attack_steps=1, eval_every=2)
    _, history = uat_ft(data["val"], data["val"].images[:0], None, 2, THREAT, config)
    assert history["teacher"] is None and len(history["pseudo_labels"]) == 0
    assert history["student"]["step"] == [2] and history["student"]["best_val_acc"] is None


class Interrupt(Exception):
    pass


def test_an_interrupted_training_resumes_from_its_checkpoint_to_the_same_weights(
        data, adversarial, tmp_path):
    state = tmp_path / "at.pt"

    def stop_at_30(step, total, what):
        if step == 30:
            raise Interrupt  # before step 30's checkpoint: the file holds step 20

    with pytest.raises(Interrupt):
        train_classifier(data["train"], data["val"], 2, CONFIG, THREAT, progress=stop_at_30,
                         state=state, checkpoint_every=10)
    assert torch.load(state, weights_only=True)["step"] == 20
    seen = []
    model, history = train_classifier(data["train"], data["val"], 2, CONFIG, THREAT,
                                      progress=lambda step, *_: seen.append(step), state=state,
                                      checkpoint_every=10)
    assert seen == [30, 40]  # went on from step 20
    assert history == adversarial[1]  # the uninterrupted run's checks, best step included
    for k, v in adversarial[0].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    again, _ = train_classifier(data["train"], data["val"], 2, CONFIG, THREAT,
                                progress=lambda *_: pytest.fail("a finished run trained"),
                                state=state)
    assert torch.equal(again.head.weight, model.head.weight)


def test_uat_ft_checkpoints_the_teacher_and_the_student(data, tmp_path):
    config = BaselineConfig(arch="preact_resnet_small", width=1, steps=4, teacher_steps=4,
                            batch_size=16, attack_steps=1, eval_every=2)
    labeled, unlabeled = data["val"].subset(torch.arange(32)), data["val"].images[32:]
    first, history = uat_ft(labeled, unlabeled, None, 2, THREAT, config, checkpoints=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"teacher.pt", "student.pt"}
    again, resumed = uat_ft(labeled, unlabeled, None, 2, THREAT, config, checkpoints=tmp_path,
                            progress=lambda *_: pytest.fail("a finished run trained"))
    assert torch.equal(resumed["pseudo_labels"], history["pseudo_labels"])
    assert torch.equal(again.head.weight, first.head.weight)
