"""The recipe's argument checks that every layer shares: an int with a lower bound, a number in an interval.

Each returns the value (a float for ``check_fraction``) or raises TypeError (wrong type) / ValueError (out of
range) naming the argument, what it got and what it needs. It imports nothing of the recipe, so every layer
(data, engine, method, ...) may use it.
"""

from __future__ import annotations

__all__ = ["check_fraction", "check_int"]


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum`` (any int when None)."""
    needs = "an int" if minimum is None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {needs}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {needs}, got {value!r}")
    return value


def check_fraction(value, name: str, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (each end open or closed); NaN is outside."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in {interval}, got {type(value).__name__} {value!r}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:  # also NaN
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value
