"""Dataclasses as JSON records: one strict check that a dict holds only a dataclass's fields."""
from __future__ import annotations

import dataclasses
from typing import Any


def known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """``d`` itself if every key is a field of dataclass ``cls``; else a ValueError naming the strays."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; known: {sorted(names)}")
    return d
