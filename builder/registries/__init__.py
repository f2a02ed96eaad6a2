"""Model registries: where `sourcing: auto` model ids are resolved.

Two backends share one protocol: `clearml` (the real ClearML SDK against a ClearML server) and
`local` (a folder of records in the same shape, for the demo and air-gapped sites).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from builder import yamldoc
from builder.errors import ConfigError, RegistryError

#: Task states that mean training finished normally (a published task is a completed one).
COMPLETED_TASK_STATES = frozenset({"completed", "published", "closed"})


@dataclass(frozen=True)
class ModelRecord:
    """The fields of a ClearML model record the builder uses."""

    id: str
    name: str
    task: str
    uri: str
    ready: bool  # ClearML's "published" flag
    framework: str | None = None
    tags: tuple[str, ...] = ()
    project: str | None = None
    design: Mapping[str, Any] = field(default_factory=dict)  # parsed config text (HOCON/JSON)


@dataclass(frozen=True)
class TaskRecord:
    id: str
    name: str
    status: str
    project: str | None = None


class ModelRegistry(Protocol):
    """What resolve and publish need of a model registry."""

    description: str  # e.g. "ClearML at http://host:8008" or "local registry /path"

    def get_model(self, model_id: str) -> ModelRecord: ...
    def get_task(self, task_id: str) -> TaskRecord: ...
    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]: ...
    def mark_published(self, model_id: str) -> bool:
        """Set the published flag; False when it already was set."""
        ...


def parse_design(design: Any, where: str) -> dict[str, Any]:
    """A model's config text (ClearML `design`) parsed the way the SDK does (HOCON or JSON)."""
    if isinstance(design, Mapping):
        text = design.get("design") if "design" in design else next(iter(design.values()), "")
    else:
        text = design
    if not text:
        return {}
    if not isinstance(text, str):
        raise RegistryError(f"{where}: model design is not text")
    from clearml.utilities.config import text_to_config_dict

    try:
        parsed = dict(text_to_config_dict(text))
        yamldoc.validate_data(parsed, "model-design", where)
    except ValueError:
        raise RegistryError(
            f"{where}: model design is not valid HOCON/JSON",
            hint="fix the model's configuration in the registry",
        ) from None
    except ConfigError as exc:
        raise RegistryError(
            exc.message, hint="fix the model's configuration in the registry"
        ) from None
    return parsed


def open_registry(spec: str) -> ModelRegistry:
    """``local:<folder>`` or ``clearml``."""
    if spec.startswith("local:"):
        from builder.registries.local import LocalRegistry

        return LocalRegistry(Path(spec.removeprefix("local:")))
    if spec == "clearml":
        from builder.registries.clearml import ClearMLRegistry

        return ClearMLRegistry()
    raise RegistryError(
        f"unknown model registry {spec!r}", hint="use 'clearml' or 'local:<folder>'"
    )
