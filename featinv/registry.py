"""A small name → factory registry (after timm's ``register_model``, CompressAI's
``register_model("name")``).

Keys are explicit snake_case strings (taps are ``encoder/layer``); registering a
key twice raises; looking up an unknown key raises :class:`UnknownNameError`
listing the valid ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from featinv.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of entries of one kind (taps, decoders, fusions, ...).

    Args:
        kind: what the entries are, used in error messages ("decoder").
        param: the params.yaml key that selects an entry ("decoder"), also for messages.
    """

    def __init__(self, kind: str, param: str | None = None) -> None:
        self.kind = kind
        self.param = param or kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; duplicates raise ``ValueError``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (non-decorator form)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Return the entry called ``name``.

        Raises:
            UnknownNameError: if no entry has that name; the message lists the valid ones.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r} (param `{self.param}`); "
                f"valid choices: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, in registration order."""
        return [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
