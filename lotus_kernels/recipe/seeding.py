"""``derive_seed``: the one way the recipe turns a tuple of ints and strings into a seed.

The data order and augmentation (``data``), the engine's per-epoch reseeding
and mixup draws (``engine.loop``) and Instant Soup's subsets and ingredient
runs (``method.instant_soup``) all derive their seeds here, so a run's random
draws are a pure function of (seed, what, epoch, step, ...) on every machine.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any mix of ints and strings, stable across runs and machines (sha256 of their repr)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
