"""Plug-in registries: built-in classes chosen by `cls` in the config and built from `params`.

Adding a plug-in is registering a class (``@PREPROCESSING.register`` and friends), nothing
else: the config loader, the error messages listing known classes and the pipeline all read
these registries.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from tilerunner.errors import ConfigError
from tilerunner.param_schema import did_you_mean, params_problem, params_schema

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
        """The registered class names, sorted."""
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        """(name, class) of every registered plug-in, sorted by name (the contract lists them)."""
        return sorted(self._classes.items())

    def get(self, name: str, where: str) -> type[T]:
        """The class called `name`, or a ConfigError naming `where` and the known classes."""
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(
                f"{where}: unknown {self.kind} plug-in class {name!r} "
                f"({did_you_mean(str(name), self.names())}known: {', '.join(self.names())})"
            ) from None

    def create(self, name: str, params: Mapping[str, Any] | None, where: str) -> T:
        """Instantiate `name` with `params`; bad or unknown params become a ConfigError."""
        cls = self.get(name, where)
        return build(cls, params or {}, f"{where} ({name})")


def build(cls: Callable[..., T], params: Mapping[str, Any], where: str) -> T:
    """cls(**params) for a dataclass, turning unknown keys and bad values into ConfigError.

    Params are first checked against the class's schema in the runner contract (see
    tilerunner.param_schema), so the runner refuses exactly what the builder's check refuses.
    """
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        problem = params_problem(params_schema(cls), dict(params))
        if problem:
            raise ConfigError(f"{where}: {problem}")
        params = _nested(cls, params, where)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _nested(cls: type, params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Params whose field type is a dataclass, built from their mapping (nested params)."""
    hints = typing.get_type_hints(cls)
    out = dict(params)
    for key, value in params.items():
        sub = hints.get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            out[key] = build(sub, value, f"{where}.{key}")
    return out
