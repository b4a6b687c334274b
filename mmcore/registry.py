"""One plug-in idiom: a named registry where a duplicate name raises and an unknown one lists the valid names.

Quality checks, augmentation schemes, robustness degradations and manifest readers each keep one
``Registry``; config fields hold a plain ``str`` checked against it, so the names are declared only
where the plug-ins are registered (never again in a ``Literal[...]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar, overload

from mmcore.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plug-in, in registration order.

    Args:
        kind: what one entry is, for messages ("check", "augmentation", "format").
        error: the exception an unknown name raises (``ConfigError`` for config values,
            ``InputError`` for properties of an input file).
        unknown: the word before ``kind`` in that message ("unknown", "unsupported").
    """

    def __init__(self, kind: str, *, error: type[Exception] = ConfigError, unknown: str = "unknown") -> None:
        self.kind = kind
        self.error = error
        self._unknown = unknown
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...
    def register(self, name, obj=None):
        """Add ``obj`` under ``name``; without ``obj``, a decorator. A name registered twice is a programming error."""
        if obj is None:
            return lambda o: self.register(name, o)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def problem(self, names: str | Iterable[str]) -> str | None:
        """What is unregistered, in one line without a location, or None if nothing is.

        One name reads "unknown augmentation 'x'", a collection "unknown check(s) 'x', 'y'".
        """
        one = isinstance(names, str)
        bad = [n for n in ([names] if one else names) if n not in self._items]
        return self._message(bad, one) if bad else None

    def _message(self, bad: list, one: bool) -> str:
        what = f"{self.kind} {bad[0]!r}" if one else f"{self.kind}(s) {', '.join(map(repr, bad))}"
        return f"{self._unknown} {what}; expected one of {', '.join(sorted(self._items))}"

    def check(self, names: str | Iterable[str], where: str | None = None) -> None:
        """Raise ``error`` if ``names`` (one name or several) holds an unregistered one; ``where`` leads the message.

        A pydantic field validator leaves ``where`` out: ``error`` is a ``ValueError``, and the config
        error already leads with the field's location.
        """
        if (msg := self.problem(names)) is not None:
            raise self.error(f"{where}: {msg}" if where else msg)

    def get(self, name: str, where: str | None = None) -> T:
        """The plug-in registered as ``name``; an unknown name raises ``error`` listing the valid ones."""
        if name not in self._items:
            msg = self._message([name], one=True)
            raise self.error(f"{where}: {msg}" if where else msg)
        return self._items[name]

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
