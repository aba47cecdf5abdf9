"""Continual-learning methods, one file each, discovered by name (``--method`` choices are the files)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from cign_train.methods.base import Inputs, Method, Option, Task, TaskData

__all__ = ["Inputs", "Method", "Option", "Task", "TaskData", "available", "get_method"]


def _registry() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Method) and obj is not Method and obj.__module__ == module.__name__:
                found[obj.NAME] = obj
    return found


def available() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> type[Method]:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(registry)}")
    return registry[name]
