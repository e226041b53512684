"""``Config``: the one base of the recipe's dataclass configs (``TrainConfig``, ``PipelineConfig``,
``InstantSoupConfig``): ``from_dict`` / ``to_dict`` and the unknown-key error, written once.

A subclass is a ``@dataclasses.dataclass`` that validates itself in ``__post_init__``;
it sets ``CONFIG_NAME`` (how errors name it) and, when a field was renamed, ``ALIASES``
{old key: field name}: old keys are accepted by ``from_dict`` only (saved configs, config
files, ``--set``), so configs written by older code still load and resume.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import ClassVar


def check_keys(keys, known, what: str) -> None:
    """ValueError naming every key of ``keys`` not in ``known``, with the closest known key where one is near."""
    unknown = sorted(str(k) for k in keys if k not in known)
    if not unknown:
        return
    hints = [f"{k!r} -> {close[0]!r}" for k in unknown if (close := difflib.get_close_matches(k, [str(n) for n in known], n=1))]
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    raise ValueError(f"unknown {what} keys: {', '.join(unknown)}{hint} (known: {', '.join(map(str, known))})")


class Config:
    """Base of a dataclass config: ``from_dict`` (unknown keys -> ValueError, old keys renamed) and ``to_dict``."""

    CONFIG_NAME: ClassVar[str] = "config"
    ALIASES: ClassVar[dict[str, str]] = {}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def renamed(cls, d: Mapping) -> dict:
        """``d`` with its old keys (``ALIASES``) under their current names; a key given both ways is a ValueError."""
        out = dict(d)
        for old, new in cls.ALIASES.items():
            if old in out:
                if new in out:
                    raise ValueError(f"{cls.CONFIG_NAME} key {old!r} is the old name of {new!r}: give one of them, not both")
                out[new] = out.pop(old)
        return out

    @classmethod
    def from_dict(cls, d: Mapping):
        """A config from a mapping (e.g. parsed JSON/YAML). Unknown keys -> ValueError listing them
        (with the closest known key); a wrong type or value -> the dataclass's own TypeError / ValueError."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping of {cls.CONFIG_NAME} keys, got {type(d).__name__}")
        d = cls.renamed(d)
        check_keys(d, cls.field_names(), cls.CONFIG_NAME)
        return cls(**d)

    def to_dict(self) -> dict:
        """The config as a plain dict of JSON values (tuples as lists); ``from_dict`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
