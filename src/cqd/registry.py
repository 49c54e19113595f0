"""Name -> builder registries (timm's `register_model` idea) for degradations, models and methods."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from cqd.errors import CQDError

T = TypeVar("T")


def import_modules(package: str, path, skip: tuple[str, ...] = ()) -> None:
    """Import every module of a package (each registers its entries on import), so that a new
    degradation, dataset, model or method is one file and nothing else is edited."""
    import importlib
    import pkgutil

    for name in sorted(m.name for m in pkgutil.iter_modules(path)):
        if name not in skip:
            importlib.import_module(f"{package}.{name}")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CQDError(
                f"Unknown {self.kind} {name!r}. Known: {', '.join(sorted(self._items))}.{hint}"
            ) from None

    def check(self, name: str) -> str:
        """A config field's validator: `name` when registered, else a ValueError listing the known names."""
        try:
            self.get(name)
        except CQDError as e:
            raise ValueError(str(e)) from None
        return name

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
