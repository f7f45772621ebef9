"""Helpers for the config files (``configs/*.py``, loaded by path through ``--config``):
the config string argument (``configs/x.py:variant=d30,runlocal``) and the execution section."""

from __future__ import annotations

import dataclasses

import ml_collections


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


def execution(**choices) -> ml_collections.ConfigDict:
    """The ``config.execution`` section: every ``hmar_jax.execution.ExecutionConfig`` field
    (but the resolved ``platform``) at its default, ``"auto"`` where it has one, with
    ``choices`` set. Every field is present so that any can be set from the command line
    (``--config.execution.remat=block``); the run resolves them for its platform."""
    from hmar_jax.execution import ExecutionConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ExecutionConfig)
                if f.name != "platform"}
    ExecutionConfig.from_mapping(choices)  # an unknown key or value fails at launch
    return ml_collections.ConfigDict(defaults | choices)
