"""Helpers shared by config files (loaded by path, so imported as ``configs.common``)."""

from __future__ import annotations


def parse_arg(arg: str | None, **defaults) -> dict:
    """``"variant=d16,res=256,runlocal"`` -> dict; bare words become True.

    Every key must be one of ``defaults`` (typos fail at launch); values are converted to
    the type of their default.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, raw = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            values[key] = raw.lower() in ("", "1", "true", "yes")
        else:
            values[key] = type(default)(raw)
    return values
