"""The ClearML backend, through the real clearml SDK, with its retry traps capped.

The SDK's defaults retry an unreachable server for hours, and its high-level ``Model``/``Task``
objects loop forever on connection errors (clearml/clearml#852). So: the bounded ``APIClient``
over a ``StrictSession`` with small retry counts and short timeouts, a hard deadline around every
call, and no call at all without an explicitly configured API host.

Server behaviour followed (allegroai/clearml-server, ``apiserver/``):
``database/model/base.py::validate_paging`` (get_all pages at ``page_size`` capped by the
server setting ``max_page_size``, 500 by default and possibly lower; the offset is
``page * min(page_size, max_page_size)``; servers before 1.2 have no cap; ``id`` is appended to
every ``order_by``), ``services/models.py::get_all`` / ``get_by_id`` (archived and public models
are returned; their ``system_tags`` hold ``archived``, public ones have ``company`` ""),
``bll/model/__init__.py::publish_model`` (``set_ready`` looks a model up in the caller's company
only), ``schema/services/models.conf`` (``project`` is a project id, ``design`` is free text),
``bll/task/task_cleanup.py`` (deleting a task rewrites its published models' ``task`` to
``__DELETED__<id>``), ``service_repo/service_repo.py`` (``_max_version``: API 2.9 is
clearml-server 0.16, 2.20 is 1.6, 2.23 is 1.9, 2.31 is 1.17 and 2.0). The SDK side: clearml
2.1.12 ``backend_api/api_proxy.py`` speaks the newest request schema it ships (2.9, 2.13, 2.20,
2.23) that the server's API version admits.
"""

from __future__ import annotations

import itertools
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any, TypeVar

from builder.cook.registries import (
    ARCHIVED_TAG,
    ModelRecord,
    ProjectRef,
    TaskRecord,
    check_clearml_id,
    parse_design,
    task_reference,
)
from builder.errors import BuilderError, ConfigError, RegistryError
from builder.paths import CLEARML_ID

T = TypeVar("T")

#: Seconds any single registry call may take, retries included.
DEADLINE_SECONDS = 15
#: The page size asked for; the server may answer fewer per page (its max_page_size).
PAGE_SIZE = 500
#: The oldest server API the SDK ships request schemas for (backend_api/services/v2_9).
MIN_API_VERSION = "2.9"
#: The services the builder calls; the APIClient is built of these alone (the SDK's default
#: set includes datasets/dataviews/frames, which it ships for API 2.23 only).
SERVICES = ("auth", "models", "projects", "tasks")
#: What the builder reads of a model when it needs no design (listing, publishing): the
#: design is free text of other teams' making and never travels.
LIST_FIELDS = (
    "id", "name", "task", "ready", "project", "framework", "tags", "system_tags", "uri",
    "company",
)  # fmt: skip
_RETRIES = {
    "total": 2,
    "connect": 2,
    "read": 2,
    "redirect": 2,
    "status": 2,
    "backoff_factor": 0.2,
    "backoff_max": 2,
}


class _Deadline(BaseException):
    """Raised by the alarm; a BaseException because the SDK swallows ``Exception``."""


@contextmanager
def sdk_deadline(
    seconds: float, what: str, error: type[BuilderError] = RegistryError
) -> Iterator[None]:
    """A hard wall-clock bound around SDK calls (whose own loops may never end)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only reach the main thread; the capped retries bound the call there
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Deadline:
        raise error(
            f"ClearML did not answer {what} within {seconds:g} s",
            hint="check CLEARML_API_HOST, the storage endpoint and the server",
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def clearml_config_errors() -> Iterator[None]:
    """A clearml.conf the SDK cannot read -> one ConfigError naming the file.

    The SDK parses its configuration lazily, on first use (clearml 2.1.12
    backend_config/config.py::_read_single_file raises ConfigurationError; unresolved
    ``${...}`` substitutions raise pyhocon's ConfigException).
    """
    from clearml.backend_config.defs import get_config_file
    from clearml.backend_config.errors import ConfigurationError
    from clearml.utilities.pyhocon.exceptions import ConfigException

    try:
        yield
    except (ConfigurationError, ConfigException) as exc:
        path = getattr(exc, "file_path", None) or get_config_file()
        reason = str(exc).split("): ", 1)[-1] if "): " in str(exc) else str(exc)
        raise ConfigError(
            f"{path}: ClearML cannot read its configuration ({reason.strip()[:200]})",
            hint="fix the file (HOCON), or point CLEARML_CONFIG_FILE at a valid one",
        ) from None


def configured_host() -> str | None:
    """The API host the SDK would use: CLEARML_API_HOST (or the SDK's older TRAINS_API_HOST),
    else clearml.conf's api.api_server / api.host; None when none is set."""
    from clearml.backend_api.session.defs import ENV_HOST

    host = (ENV_HOST.get() or "").strip()
    if host:
        return host.rstrip("/")
    from clearml.config import config_obj

    with clearml_config_errors():
        configured = config_obj.get("api.api_server", None) or config_obj.get("api.host", None)
    return str(configured).rstrip("/") if configured else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


class ClearMLRegistry:
    """The model registry of a ClearML server, through the clearml SDK's API client."""

    def __init__(self) -> None:
        host = configured_host()
        if not host:
            raise RegistryError(
                "no ClearML API host configured",
                hint="set CLEARML_API_HOST or api.api_server in clearml.conf; the builder never falls back to the public SaaS",
            )
        self.host = host
        self.description = f"ClearML at {host}"
        self._client: Any = None

    def _api(self) -> Any:
        if self._client is None:
            from clearml.backend_api import services
            from clearml.backend_api.session import Session
            from clearml.backend_api.session.client import APIClient
            from clearml.backend_api.session.client.client import StrictSession

            # A short read timeout instead of the SDK's 300 s; it is a private class attribute,
            # so this is process-wide (the builder is the only SDK user in its process).
            StrictSession._session_timeout = (5.0, 10.0)
            session = self._call(
                "login", lambda: StrictSession(host=self.host, http_retries_config=dict(_RETRIES))
            )
            server_api = str(Session.max_api_version)
            if _version(server_api) < _version(MIN_API_VERSION):
                server = (
                    f" (clearml-server {Session.server_version})" if Session.server_version else ""
                )
                raise RegistryError(
                    f"ClearML at {self.host} speaks API {server_api}{server}; the builder needs "
                    f"API {MIN_API_VERSION} or newer (clearml-server 0.16 or newer)",
                    hint="upgrade the ClearML server",
                )
            only = SimpleNamespace(
                __all__=list(SERVICES), **{n: getattr(services, n) for n in SERVICES}
            )
            self._client = APIClient(session=session, api_services=only)
        return self._client

    def _call(self, what: str, action: Callable[[], T]) -> T:
        from clearml.backend_api.session.client import APIError
        from clearml.backend_api.session.defs import MissingConfigError
        from clearml.backend_api.session.session import LoginError

        try:
            with clearml_config_errors(), sdk_deadline(DEADLINE_SECONDS, what):
                return action()
        except APIError as exc:
            raise _api_error(exc, what, self.host) from None
        except LoginError as exc:
            text = str(exc)
            if "401" in text or "nauthorized" in text:
                raise RegistryError(
                    f"ClearML at {self.host} rejected the credentials",
                    hint="check CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY or clearml.conf",
                ) from None
            raise RegistryError(
                f"cannot log in to ClearML at {self.host}: server unreachable or failing"
            ) from None
        except MissingConfigError:
            raise RegistryError(
                "no ClearML credentials configured",
                hint="set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, or clearml.conf",
            ) from None
        except BuilderError:
            raise
        except Exception as exc:  # requests/urllib3 errors after the capped retries
            raise RegistryError(
                f"ClearML at {self.host} failed on {what}: {type(exc).__name__}"
            ) from None

    def get_model(self, model_id: str, *, design: bool = True) -> ModelRecord:
        """The model's record from the server; with ``design=False`` its design is not fetched."""
        model_id = check_clearml_id(model_id.strip(), "ClearML model id")
        where = f"ClearML model {model_id}"
        if not design:  # one get_all with a projection: the design is never sent
            found = [
                m
                for m in self._get_all(
                    "models", {"id": [model_id], "only_fields": list(LIST_FIELDS)}
                )
                if m.id == model_id
            ]
            if not found:
                raise RegistryError(
                    f"model {model_id} not found in ClearML at {self.host}",
                    hint="check the model id, or `builder models list`",
                )
            return _model_record(found[0], where)
        api = self._api()
        m = self._call(f"models.get_by_id {model_id}", lambda: api.models.get_by_id(model=model_id))
        return _model_record(m, where, design=parse_design(m.design, where))

    def get_task(self, task_id: str) -> TaskRecord:
        """The task's record from the server (ids checked, status as a plain string)."""
        task_id = check_clearml_id(task_id, "ClearML task id")
        api = self._api()
        t = self._call(f"tasks.get_by_id {task_id}", lambda: api.tasks.get_by_id(task=task_id))
        status = t.status.value if hasattr(t.status, "value") else str(t.status)
        where = f"ClearML task {task_id}"
        return TaskRecord(
            id=check_clearml_id(t.id, f"{where}: id"),
            name=t.name or "",
            status=status,
            project=_optional_id(t.project, f"{where}: project"),
        )

    def get_project(self, project_id: str) -> ProjectRef | None:
        """The project with this id from the server, None when it has none."""
        project_id = check_clearml_id(project_id, "ClearML project id")
        found = self._get_all("projects", {"id": [project_id], "only_fields": ["id", "name"]})
        return next((ProjectRef(p.id, p.name or "") for p in found if p.id == project_id), None)

    def _get_all(self, service: str, query: dict[str, Any]) -> list[Any]:
        """Every record of ``<service>.get_all``, page by page, until the server says the list
        is complete, whatever its page cap.

        The server answers ``min(page_size, max_page_size)`` records from offset ``page *
        min(page_size, max_page_size)`` (database/model/base.py::validate_paging), so pages stay
        contiguous under any cap. The list is complete at an empty page or at a page shorter
        than an earlier one; a first page shorter than asked says nothing yet (all there is,
        or the server's cap), so the next page is asked for, unless every id asked for has
        come. Ordered by creation time, then id (both immutable): a record created meanwhile
        lands at the end, and the builder filters on mutable state (archived, published)
        itself, so a change of state while the pages are read shifts no other record out of
        them. Ids seen on an earlier page are skipped; a full page with nothing new means the
        server ignores paging: refused, never looped.
        """
        get_all = getattr(self._api(), service).get_all
        out: list[Any] = []
        seen: set[str] = set()
        longest = 0
        asked = set(query["id"]) if "id" in query else None  # at most these can come
        for page in itertools.count():
            body = {"order_by": ["created"], **query, "page": page, "page_size": PAGE_SIZE}
            batch = list(self._call(f"{service}.get_all", partial(get_all, **body)) or ())
            fresh = [item for item in batch if item.id not in seen]
            if batch and not fresh:
                raise RegistryError(
                    f"ClearML at {self.host} answered page {page} of {service}.get_all "
                    "with records of earlier pages only; it does not page"
                )
            seen.update(item.id for item in fresh)
            out.extend(fresh)
            if not batch or len(batch) < longest or (asked is not None and asked <= seen):
                break
            longest = len(batch)
        return out

    def _project_ids(self, project: str) -> list[str]:
        """A project given by id or by full name -> its id(s); none is an error."""
        if CLEARML_ID.fullmatch(project) and self.get_project(project):
            return [project]
        found = self._get_all(
            "projects",
            {
                "name": f"^{re.escape(project)}$",
                "only_fields": ["id", "name"],
                "search_hidden": True,
            },
        )
        ids = [check_clearml_id(p.id, "ClearML project id") for p in found]
        if not ids:
            raise RegistryError(
                f"no project {project!r} in ClearML at {self.host}",
                hint="give the project's full name (e.g. 'pathology/breast') or its id",
            )
        return ids

    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]:
        """Every non-archived model on the server (all pages), without designs."""
        query: dict[str, Any] = {"only_fields": list(LIST_FIELDS)}
        if project is not None:
            query["project"] = self._project_ids(project)
        found = [
            m
            for m in self._get_all("models", query)
            if ARCHIVED_TAG not in (m.system_tags or ())
            and (published is None or bool(m.ready) == published)
        ]
        names = self._project_names({m.project for m in found if m.project})
        newest_first = reversed(found)
        return [
            _model_record(m, f"ClearML model {m.id}", project_names=names) for m in newest_first
        ]

    def _project_names(self, ids: set[str]) -> dict[str, str]:
        wanted = sorted(i for i in ids if CLEARML_ID.fullmatch(i))
        if not wanted:
            return {}
        found = self._get_all("projects", {"id": wanted, "only_fields": ["id", "name"]})
        return {p.id: p.name or "" for p in found}

    def mark_published(self, model_id: str) -> bool:
        """Publish the model on the server; False when it already was published."""
        from clearml.backend_api.session.client import APIError

        api = self._api()
        try:
            with sdk_deadline(DEADLINE_SECONDS, "models.set_ready"):
                api.models.set_ready(model=model_id, publish_task=False)
        except APIError as exc:
            if tuple(exc.codes) == (400, 203):  # "Model is ready": already published
                return False
            if tuple(exc.codes) == (400, 201):  # looked up in the caller's company only
                raise RegistryError(
                    f"ClearML at {self.host} does not let this account publish model "
                    f"{model_id}: models.set_ready answered that the model is not one of its "
                    "company's (deleted meanwhile, or a public model)"
                ) from None
            raise _api_error(exc, f"models.set_ready {model_id}", self.host) from None
        return True


def _optional_id(value: Any, what: str) -> str | None:
    return check_clearml_id(value, what) if value else None


def _model_record(
    m: Any,
    where: str,
    *,
    design: dict[str, Any] | None = None,
    project_names: dict[str, str] | None = None,
) -> ModelRecord:
    """A server model record -> ModelRecord, every id in it checked before use."""
    task, deleted = task_reference(m.task, where)
    project = _optional_id(m.project, f"{where}: project")
    return ModelRecord(
        id=check_clearml_id(m.id, f"{where}: id"),
        name=m.name or "",
        task=task,
        uri=m.uri or "",
        ready=bool(m.ready),
        framework=m.framework,
        tags=tuple(m.tags or ()),
        project=project,
        design=design or {},
        system_tags=tuple(m.system_tags or ()),
        task_deleted=deleted,
        project_name=(project_names or {}).get(project or ""),
        public=getattr(m, "company", None) == "",
    )


def _api_error(exc: Any, what: str, host: str) -> RegistryError:
    """An APIError -> one line; ``what`` is ``<endpoint> <id>``."""
    codes = tuple(getattr(exc, "codes", ()) or ())
    endpoint, _, target = what.partition(" ")
    if codes == (400, 201):
        return RegistryError(
            f"model {target} not found in ClearML at {host}",
            hint="check the reference in the analysis YAML",
        )
    if codes == (400, 101):
        return RegistryError(f"task {target} not found in ClearML at {host}")
    if codes[:1] == (401,):
        return RegistryError(
            f"ClearML at {host} rejected the credentials",
            hint="check CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY",
        )
    code = "/".join(str(c) for c in codes) or "?"
    return RegistryError(
        f"ClearML at {host} answered {code} on {endpoint}" + (f" for {target}" if target else "")
    )
