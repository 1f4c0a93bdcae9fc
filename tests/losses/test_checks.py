"""The shared argument checks (alignlib/losses/_checks.py): every message names the argument and the value."""

import math

import pytest

from alignlib.losses._checks import (
    MIN_POSITIVE,
    UNIT_INTERVAL,
    Interval,
    check_coefficient,
    check_label_smoothing,
    check_positive,
    check_range,
)


def test_intervals_print_and_contain_as_written():
    half_open = Interval(0.0, 0.5, high_open=True)
    assert str(half_open) == "[0, 0.5)"
    assert str(Interval(0.0, 0.5, low_open=True, high_open=True)) == "(0, 0.5)"
    assert 0.0 in half_open and 0.5 not in half_open and 0.5 in Interval(0.0, 0.5)
    assert 1.0 in UNIT_INTERVAL and -1e-300 not in UNIT_INTERVAL


@pytest.mark.parametrize(
    ("value", "allow_zero", "message"),
    [
        (0.0, False, "kl_coef must be a finite number > 0, got 0.0"),
        (-1.0, True, "kl_coef must be a finite number >= 0, got -1.0"),
        (math.nan, True, "kl_coef must be a finite number >= 0, got nan"),
        (True, True, "kl_coef must be a finite number >= 0, got True"),
        ("0.1", False, "kl_coef must be a finite number > 0, got '0.1'"),
        (1e-40, False, "kl_coef must be at least 1.18e-38"),
        (1e-40, True, "kl_coef must be 0 or at least 1.18e-38"),
        (2e6, True, "kl_coef must be at most 1e+06, got 2000000.0"),
    ],
)
def test_check_positive_refuses_by_name_and_value(value, allow_zero, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("+", "\\+")):
        check_positive("kl_coef", value, allow_zero=allow_zero, upper=1e6)


def test_check_positive_accepts_its_edges():
    check_positive("beta", MIN_POSITIVE)
    check_positive("beta", 1e6, upper=1e6)
    check_positive("kl_coef", 0, allow_zero=True)


def test_check_range_and_coefficient():
    check_range("lam", 0.0, UNIT_INTERVAL)
    with pytest.raises(ValueError, match=r"^lam must lie in \[0, 1\], got 1.5$"):
        check_range("lam", 1.5, UNIT_INTERVAL)
    with pytest.raises(ValueError, match=r"^gamma must be finite \(a real number\), got inf$"):
        check_coefficient("gamma", math.inf)
    with pytest.raises(ValueError, match=r"^alpha must lie in \[-1e\+06, 1e\+06\], got -2000000.0$"):
        check_coefficient("alpha", -2e6)


def test_label_smoothing_is_checked_against_the_interval_of_its_loss_type():
    ranges = {"sigmoid": Interval(0.0, 0.5, high_open=True), "exo": Interval(0.0, 0.5, low_open=True)}
    check_label_smoothing(0.0, "sigmoid", ranges)
    check_label_smoothing(0.0, "hinge", ranges)
    out_of_range = r"label_smoothing must lie in \(0, 0.5\] for loss_type='exo' \(use 1e-3\), got 0.0"
    with pytest.raises(ValueError, match=out_of_range):
        check_label_smoothing(0.0, "exo", ranges, {"exo": "use 1e-3"})
    not_read = "label_smoothing=0.1 has no effect on loss_type='hinge'; it is read only by sigmoid, exo"
    with pytest.raises(ValueError, match=not_read):
        check_label_smoothing(0.1, "hinge", ranges)
    with pytest.raises(ValueError, match="label_smoothing must be finite"):
        check_label_smoothing(math.nan, "hinge", ranges)
