"""Building frozen config dataclasses from stored dicts, refusing unknown keys."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
    """``cls(**values)``, or one error naming every unknown key and the known ones (a
    checkpoint written by a newer version or a mistyped key, not a silently dropped one)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}.")
    return cls(**values)
