"""Model registries: where `sourcing: auto` model ids are resolved.

Two backends share one protocol: `clearml` (the real ClearML SDK against a ClearML server) and
`local` (a folder of records in the same shape, for the demo and air-gapped sites).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from builder import yamldoc
from builder.errors import ConfigError, RegistryError
from builder.paths import CLEARML_ID, check_id

#: Task states that mean training finished normally (a published task is a completed one).
COMPLETED_TASK_STATES = frozenset({"completed", "published", "closed"})
#: What clearml-server writes into a model's `task` when its creating task is deleted
#: (apiserver/bll/task/task_cleanup.py::cleanup_task, ``deleted_prefix`` of bll/task/utils.py).
DELETED_TASK_PREFIX = "__DELETED__"
#: The task status the builder records for a model whose creating task was deleted.
TASK_DELETED = "deleted"
#: The system tag the ClearML UI sets when a model is archived (models.conf, system_tags).
ARCHIVED_TAG = "archived"
#: The system tag of a weights *package*: the model's file is an archive of several files that
#: the SDK extracts on ``get_local_copy`` (clearml 2.1.12 model.py: ``Model._package_tag``,
#: ``update_weights_package``, ``get_weights_package``).
PACKAGE_TAG = "package"


@dataclass(frozen=True)
class ModelRecord:
    """The fields of a ClearML model record the builder uses.

    `task` is always a bare task id; `task_deleted` says the server had rewritten it to
    ``__DELETED__<id>`` (the task was deleted after the model was published). `project` is
    the project *id*, as on the server; `project_name` its name when looked up.
    """

    id: str
    name: str
    task: str
    uri: str
    ready: bool  # ClearML's "published" flag
    framework: str | None = None
    tags: tuple[str, ...] = ()
    project: str | None = None
    design: Mapping[str, Any] = field(default_factory=dict)  # parsed config text (HOCON/JSON)
    system_tags: tuple[str, ...] = ()
    task_deleted: bool = False
    project_name: str | None = None
    #: A public model (``company`` empty): every company reads it, none may change it
    #: (clearml-server bll/model/__init__.py::get_company_model_by_id, used by set_ready).
    public: bool = False

    @property
    def archived(self) -> bool:
        """Whether the registry archived the model (system tag ``archived``): never built."""
        return ARCHIVED_TAG in self.system_tags

    @property
    def package(self) -> bool:
        """The weights file is an archive the SDK extracts (system tag ``package``)."""
        return PACKAGE_TAG in self.system_tags


@dataclass(frozen=True)
class TaskRecord:
    """A training task as the registry gives it: id, name, status and project."""

    id: str
    name: str
    status: str
    project: str | None = None


@dataclass(frozen=True)
class ProjectRef:
    """A project's id (what model records hold) and its full name (what people type)."""

    id: str
    name: str


class ModelRegistry(Protocol):
    """What resolve and publish need of a model registry."""

    description: str  # e.g. "ClearML at http://host:8008" or "local registry /path"

    def get_model(self, model_id: str, *, design: bool = True) -> ModelRecord:
        """The model's record; with ``design=False`` its design is neither read nor parsed."""
        ...

    def get_task(self, task_id: str) -> TaskRecord:
        """The task's record (RegistryError when there is none)."""
        ...

    def get_project(self, project_id: str) -> ProjectRef | None:
        """The project with this id, None when the registry has no such project."""
        ...

    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]:
        """Every non-archived model (all pages), without designs; `project` is a name or an id."""
        ...

    def mark_published(self, model_id: str) -> bool:
        """Set the published flag; False when it already was set."""
        ...


def check_clearml_id(value: object, what: str) -> str:
    """`value` if it is a whole ClearML id (32 lowercase hex); RegistryError otherwise."""
    return check_id(value, what=what, pattern=CLEARML_ID, error=RegistryError)


def task_reference(value: object, where: str) -> tuple[str, bool]:
    """A model record's `task` field -> (task id, deleted), ids checked.

    Deleting a task rewrites the `task` of its published models to ``__DELETED__<id>``
    (clearml-server bll/task/task_cleanup.py); the original id is kept for provenance.
    """
    if value is None or value == "":
        return "", False  # the server unsets `task` of models still used by other tasks
    text = value if isinstance(value, str) else ""
    deleted = text.startswith(DELETED_TASK_PREFIX)
    task_id = text.removeprefix(DELETED_TASK_PREFIX) if deleted else value
    return check_clearml_id(task_id, f"{where}: task id"), deleted


@functools.lru_cache(maxsize=256)
def _hocon(text: str) -> Any:
    """A design text parsed as the SDK does (HOCON), kept: every customer of a fleet worker
    that uses the same model needs it, and parsing is most of resolving a model. Callers get
    copies: the kept value is never handed out."""
    from clearml.utilities.config import text_to_config_dict

    return text_to_config_dict(text)


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
    try:
        tree = _hocon(text)
        if not isinstance(tree, Mapping):  # HOCON/JSON text may be a list
            raise RegistryError(
                f"{where}: model design is a {type(tree).__name__}, not a mapping",
                hint="fix the model's configuration in the registry",
            )
        parsed = copy.deepcopy(dict(tree))
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
