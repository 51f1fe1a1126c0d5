"""A small open registry: one per axis (methods, backbones, datasets), looked up by name.

This module imports nothing heavy: the config layer keeps its registries here. A registry may name a *provider*
module (a string, imported on first need) whose import fills it, so a lookup works before anyone imported it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Maps names to objects; ``register(name)`` is a decorator, ``get(name)`` fails with the valid names.

    ``provider`` is a module name imported (once it is needed) by ``get`` on an unknown name and by ``names()``,
    e.g. ``Registry("method", provider="retain.methods")``; registration itself never imports it.
    """

    def __init__(self, kind: str, provider: str | None = None) -> None:
        self.kind = kind
        self.provider = provider
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator registering an object as ``name``; a name can be registered once."""

        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def load(self) -> None:
        """Import the provider module (if any), which registers its entries; a no-op once imported."""
        if self.provider is not None:
            importlib.import_module(self.provider)

    def get(self, name: str) -> Any:
        """The object registered as ``name``; KeyError listing the valid names if there is none."""
        if name not in self._items:
            self.load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """All registered names, sorted (after importing the provider)."""
        self.load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
