"""The head rule for submitted labeled sets: no early stopping on a handful of images."""

import pytest

from byorl.service.jobs.head_rule import MIN_LABELS_FOR_HOLDOUT, SMALL_SET_L2, head_rule


def test_small_sets_hold_nothing_out_and_take_the_studys_l2():
    assert head_rule(24, False, None, None) == (0.0, "nonrobust", SMALL_SET_L2)
    assert head_rule(MIN_LABELS_FOR_HOLDOUT - 1, False, None, None)[:2] == (0.0, "nonrobust")


def test_large_sets_hold_out_ten_percent_and_choose_l2_on_it():
    fraction, kind, _ = head_rule(MIN_LABELS_FOR_HOLDOUT, False, None, None)
    assert fraction == pytest.approx(0.1) and kind == "l2"
    assert MIN_LABELS_FOR_HOLDOUT * fraction >= 100  # enough to early-stop on


def test_explicit_values_win():
    assert head_rule(24, False, 0.25, None) == (0.25, "l2", 0.0)  # 6 held out: chosen on them
    assert head_rule(5000, False, None, 0.01) == (0.1, "nonrobust", 0.01)
    assert head_rule(5000, False, 0.0, None) == (0.0, "nonrobust", SMALL_SET_L2)
    assert head_rule(24, True, None, None) == (0.0, "robust", 0.0)
    assert head_rule(24, True, None, 0.3) == (0.0, "robust", 0.3)
