"""recipe.checks: the argument checks every recipe layer shares, with the exact messages users see."""

import math

import pytest

from lotus_kernels.recipe.checks import check_fraction, check_int


def test_check_int_names_the_argument_what_it_got_and_what_it_needs():
    assert check_int(3, "epochs", 1) == 3 and check_int(-5, "seed") == -5 and check_int(0, "holdout", 0) == 0
    with pytest.raises(ValueError, match=r"^epochs must be an int >= 1, got 0$"):
        check_int(0, "epochs", 1)
    with pytest.raises(TypeError, match=r"^epochs must be an int >= 1, got float 2\.0$"):
        check_int(2.0, "epochs", 1)
    with pytest.raises(TypeError, match=r"^seed must be an int, got bool True$"):  # a bool is not a count
        check_int(True, "seed")


@pytest.mark.parametrize(
    "value,low_open,high_open,ok",
    [(0.0, False, False, True), (0.0, True, False, False), (1.0, False, True, False), (1.0, False, False, True), (0.5, True, True, True),
     (math.nan, False, False, False), (math.inf, False, False, False)],
)
def test_check_fraction_ends_open_or_closed(value, low_open, high_open, ok):
    if ok:
        assert check_fraction(value, "f", 0, 1, low_open, high_open) == value
    else:
        with pytest.raises(ValueError, match=r"^f must be in [\[(]0, 1[\])], got "):
            check_fraction(value, "f", 0, 1, low_open, high_open)


def test_check_fraction_refuses_what_is_not_a_number():
    assert check_fraction(1, "prune_step", 0, 1, True, False) == 1.0 and isinstance(check_fraction(1, "p", 0, 1, True, False), float)
    for bad in ("0.5", None, False):
        with pytest.raises(TypeError, match=r"^prune_step must be a float in \(0, 1\), got "):
            check_fraction(bad, "prune_step", 0, 1, True, True)
