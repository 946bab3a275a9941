"""Saved configs load as what they were trained with; today's defaults are the paper's."""

import json
from pathlib import Path

import pytest

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
