"""One registry shape for what users extend: backbones, gathers, edge blocks and nets, tasks.

Like timm's ``register_model``: ``@REGISTRY.register("name")`` (or ``REGISTRY.add``) files a
value under a name, ``REGISTRY.get("name")`` finds it or raises an error listing the choices.
Each registry names its kind (``"edge block"``) and the error it raises (``ConfigError`` unless
told otherwise), so its messages read ``unknown edge block 'x'; choose one of a, b, c``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mist_fed.errors import ConfigError, MistError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to values of one kind. A name is registered once: a second time is an error."""

    def __init__(self, kind: str, error: type[MistError] = ConfigError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def add(self, name: str, value: T) -> T:
        """File ``value`` under ``name``; a name already taken raises ``error``."""
        if name in self._items:
            raise self.error(
                f"{self.kind} {name!r} is already registered; register yours under another name"
            )
        self._items[name] = value
        return value

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@registry.register("name")``."""

        def deco(value: T) -> T:
            return self.add(name, value)

        return deco

    def get(self, name: str) -> T:
        """The value under ``name``; an unknown name raises ``error`` listing the choices."""
        if name not in self._items:
            choices = ", ".join(self.names()) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {choices}")
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
