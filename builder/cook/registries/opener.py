"""Open the model registry a setting names: ``local:<folder>`` or ``clearml``.

Apart from the package's protocol because both implementations import that protocol.
"""

from __future__ import annotations

from pathlib import Path

from builder.cook.registries import ModelRegistry
from builder.cook.registries.clearml import ClearMLRegistry
from builder.cook.registries.local import LocalRegistry
from builder.errors import RegistryError


def open_registry(spec: str) -> ModelRegistry:
    """``local:<folder>`` or ``clearml``."""
    if spec.startswith("local:"):
        return LocalRegistry(Path(spec.removeprefix("local:")))
    if spec == "clearml":
        return ClearMLRegistry()
    raise RegistryError(
        f"unknown model registry {spec!r}", hint="use 'clearml' or 'local:<folder>'"
    )
