"""One registry shape for every name a config can hold: labelers, tasks, layers, classifier backends.

Shaped after timm's model registry, so that a user who has added one kind of entry knows how to add
the others: ``register`` records an entry under a name (warning, or refusing, when another entry
takes a name already taken), ``list`` returns the names an fnmatch pattern selects, and ``get``
fails loudly on an unknown name, listing the valid ones and saying how to add one. A misspelt name
in a config is then caught when the config is read, with the fix in the same sentence.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
#: what ``register`` does when a name is taken by another entry
ON_OVERWRITE = ("warn", "refuse")


class UnknownName(KeyError):
    """An unknown name. A ``KeyError`` (what a lookup raises), whose message reads as written: a plain
    ``KeyError`` prints its message quoted, with every quote inside escaped."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Entries of one kind by name.

    :param kind: what an entry is, in messages (``"labeler"``, ``"task"``, ``"layer"``).
    :param how_to_add: appended to the unknown-name error (e.g. the decorator to use).
    :param on_overwrite: ``warn`` (the later entry wins, as timm) or ``refuse`` (a ``ValueError``).
    :param ordered: ``list`` keeps registration order (layers: forward order) instead of sorting.
    """

    def __init__(self, kind: str, how_to_add: str = "", on_overwrite: str = "warn", ordered: bool = False) -> None:
        if on_overwrite not in ON_OVERWRITE:
            raise ValueError(f"on_overwrite must be one of {ON_OVERWRITE}, got {on_overwrite!r}")
        self.kind, self.how_to_add, self.on_overwrite, self.ordered = kind, how_to_add, on_overwrite, ordered
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Record ``entry`` under ``name``; re-registering the same entry is a no-op."""
        old = self._entries.get(name)
        if old is not None and old is not entry:
            if self.on_overwrite == "refuse":
                raise ValueError(f"{self.kind} {name!r} is already registered")
            warnings.warn(f"{self.kind} {name!r} is registered twice; the later definition wins", stacklevel=3)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")``: register the decorated object under ``name``."""
        def wrap(entry: T) -> T:
            return self.register(name, entry)
        return wrap

    def list(self, pattern: str = "*") -> list[str]:
        """Names matching the fnmatch ``pattern`` (sorted, or in registration order if ``ordered``)."""
        names = [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]
        return names if self.ordered else sorted(names)

    def unknown(self, name: str) -> str:
        """The sentence an unknown ``name`` gets: what is valid, and how to add one."""
        valid = ", ".join(self.list())
        return f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}" + (f". {self.how_to_add}"
                                                                              if self.how_to_add else "")

    def check(self, name: str) -> None:
        """Fail on an unknown ``name`` (:meth:`unknown`), e.g. when a config is read."""
        if name not in self._entries:
            raise UnknownName(self.unknown(name))

    def get(self, name: str) -> T:
        self.check(name)
        return self._entries[name]

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.list()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)
