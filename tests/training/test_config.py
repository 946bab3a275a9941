"""Saved configs load as what they were trained with; today's defaults are the paper's."""

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from byorl.cli import app
from byorl.training.config import LEGACY, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "results" / "cpu-default" / "train-byorl-linf" / "config.json"


def test_a_config_saved_before_the_bn_fields_loads_as_it_was_trained():
    """The shipped encoders' config (written before bn_views/sync_bn existed) trained both
    views as one batch in one process: it must keep meaning that, and keep every other value."""
    saved = json.loads(SHIPPED.read_text())
    assert "bn_views" not in saved and "sync_bn" not in saved
    cfg = TrainConfig.from_dict(saved)
    assert (cfg.bn_views, cfg.sync_bn) == ("concat", False) == (LEGACY["bn_views"],
                                                                LEGACY["sync_bn"])
    again = json.loads(json.dumps(cfg.to_dict()))
    assert {k: v for k, v in again.items() if k not in (*LEGACY, "compile")} == saved
    assert TrainConfig.from_dict(again) == cfg  # now written out explicitly


def test_a_fresh_config_is_the_papers_and_survives_a_round_trip():
    cfg = TrainConfig()
    assert (cfg.bn_views, cfg.sync_bn, cfg.compile) == ("separate", True, "auto")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("field,value", [("bn_views", "mixed"), ("compile", "yes"),
                                         ("precision", "fp16")])
def test_unknown_choices_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_a_saved_config_with_an_unknown_field_or_a_wrong_type_is_refused():
    with pytest.raises(ValidationError, match="attack.stpes"):  # a typo never trains a default
        TrainConfig.from_dict({"attack": {"stpes": 3}})
    with pytest.raises(ValidationError, match="optim.batch_size"):
        TrainConfig.from_dict({"optim": {"batch_size": "big"}})
    cfg = TrainConfig.from_dict({"augment": {"crop_scale": [0.2, 1.0]}})
    assert cfg.augment.crop_scale == (0.2, 1.0)  # JSON lists are the tuples they were


def test_assignments_are_validated_too():
    cfg = TrainConfig()
    with pytest.raises(ValidationError, match="eps"):
        cfg.attack.eps = -1.0


def plain(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_a_bad_flag_fails_at_once_naming_the_field(tmp_path):
    run = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--epochs", "-1"])
    assert run.exit_code == 2
    assert "optim.epochs: Input should be greater than 0" in plain(run.output)
    assert not (tmp_path / "r").exists()  # nothing started
    run = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--attack", "fgsm"])
    assert run.exit_code == 2
    assert "'fgsm' is not one of 'apgd', 'pgd', 'none'" in plain(run.output)


def test_help_lists_the_fixed_choices():
    text = plain(CliRunner().invoke(app, ["train", "--help"]).output)
    for choices in ("<apgd|pgd|none>", "<linf|l2>", "<separate|concat>", "<auto|on|off>",
                    "<auto|fp32|bf16>", "<auto|cpu|cuda>"):
        assert choices in text


def test_every_flag_sets_its_config_field(tmp_path, monkeypatch):
    """The flags are the config's fields (named as the scripts use them), merged over the base
    config: what is not given keeps the saved value."""
    import byorl.training.train

    ran = []
    monkeypatch.setattr(byorl.training.train, "train", lambda cfg, **kw: ran.append((cfg, kw)))
    saved = TrainConfig(seed=5, data={"extra_unlabeled": ["a"]})
    saved.save(tmp_path / "base.json")
    run = CliRunner().invoke(app, [
        "train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "base.json"),
        "--eps", "128/255", "--norm", "l2", "--attack", "none", "--steps", "3", "--epochs", "2.5",
        "--min-crop", "0.3", "--data", "cifar100", "--data-root", "d", "--no-sync-bn",
        "--precision", "bf16", "--device", "cpu", "--max-steps", "7", "--time-limit-min", "2"])
    assert run.exit_code == 0, run.output
    (cfg, kw), = ran
    assert (cfg.attack.eps, cfg.attack.norm, cfg.attack.method, cfg.attack.steps) == (
        128 / 255, "l2", "none", 3)
    assert (cfg.optim.epochs, cfg.augment.crop_scale, cfg.sync_bn) == (2.5, (0.3, 1.0), False)
    assert (cfg.data.source, cfg.data.root, cfg.precision, cfg.device) == (
        "cifar100", "d", "bf16", "cpu")
    assert (cfg.seed, cfg.data.extra_unlabeled, cfg.out) == (5, ["a"], str(tmp_path / "r"))
    assert kw == {"max_steps": 7, "time_limit_s": 120.0}
    untouched = ("model", "seed", "log_every", "checkpoint_every", "bn_views", "compile")
    assert {k: cfg.to_dict()[k] for k in untouched} == {k: saved.to_dict()[k] for k in untouched}
    assert cfg.optim.model_copy(update={"epochs": saved.optim.epochs}) == saved.optim


def test_repeated_list_flags_replace_the_saved_list(tmp_path, monkeypatch):
    import byorl.training.train

    ran = []
    monkeypatch.setattr(byorl.training.train, "train", lambda cfg, **kw: ran.append(cfg))
    TrainConfig(data={"extra_unlabeled": ["a"]}).save(tmp_path / "base.json")
    run = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "base.json"),
                                   "--extra-unlabeled", "b", "--extra-unlabeled", "c"])
    assert run.exit_code == 0, run.output
    assert ran[0].data.extra_unlabeled == ["b", "c"]
