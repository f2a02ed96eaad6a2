"""Plug-in registries: built-in classes chosen by `cls` in the config and built from `params`.

Adding a plug-in is registering a class (``@PREPROCESSING.register`` and friends), nothing
else: the config loader, the error messages listing known classes and the pipeline all read
these registries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from tilerunner.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class for one kind of plug-in."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` selectable as `cls: <ClassName>`."""
        name = cls.__name__
        if name in self._classes:
            raise ValueError(f"{self.kind} plug-in {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str, where: str) -> type[T]:
        """The class called `name`, or a ConfigError naming `where` and the known classes."""
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(
                f"{where}: unknown {self.kind} plug-in class {name!r} "
                f"(known: {', '.join(self.names())})"
            ) from None

    def create(self, name: str, params: Mapping[str, Any] | None, where: str) -> T:
        """Instantiate `name` with `params`; bad or unknown params become a ConfigError."""
        cls = self.get(name, where)
        return build(cls, params or {}, f"{where} ({name})")


def build(cls: Callable[..., T], params: Mapping[str, Any], where: str) -> T:
    """cls(**params) for a dataclass, turning unknown keys and bad values into ConfigError."""
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown params {', '.join(map(repr, unknown))} "
                f"(accepted: {', '.join(sorted(known)) or 'none'})"
            )
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
