"""Named presets of the configuration dataclasses (the models', the hypernetwork's, a run's): one lookup, one error."""
from __future__ import annotations

from dataclasses import replace


def pick(table: dict, name: str, what: str, **overrides):
    """A copy of preset `name` of `table` with `overrides`; an unknown name is one ValueError listing the known."""
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose from {', '.join(sorted(table))}")
    return replace(table[name], **overrides)
