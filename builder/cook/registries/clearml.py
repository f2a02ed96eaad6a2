"""The ClearML backend, through the real clearml SDK, with its retry traps capped.

The SDK's defaults retry an unreachable server for hours, and its high-level ``Model``/``Task``
objects loop forever on connection errors (clearml/clearml#852). So: the bounded ``APIClient``
over a ``StrictSession`` with small retry counts and short timeouts, a hard deadline around every
call, and no call at all without an explicitly configured API host.

Server behaviour followed (allegroai/clearml-server 2.0, ``apiserver/``):
``database/model/base.py::validate_paging`` (get_all pages at ``max_page_size`` = 500, the
default *and* the maximum page size; ``id`` is appended to every ``order_by``),
``services/models.py::get_all`` / ``get_by_id`` (archived models are returned by id; their
``system_tags`` hold ``archived``), ``schema/services/models.conf`` (``project`` is a project
id, ``design`` is free text), ``bll/task/task_cleanup.py`` (deleting a task rewrites its
published models' ``task`` to ``__DELETED__<id>``). The SDK side: clearml 2.1.12
``model.py::Model.query_models`` pages the same way (page_size 500 until a short page).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from builder.cook.registries import (
    ModelRecord,
    ProjectRef,
    TaskRecord,
    check_clearml_id,
    parse_design,
    task_reference,
)
from builder.errors import BuilderError, RegistryError
from builder.paths import CLEARML_ID

T = TypeVar("T")

#: Seconds any single registry call may take, retries included.
DEADLINE_SECONDS = 15
#: clearml-server's max_page_size (config/default/services/_mongo.conf): default and maximum.
PAGE_SIZE = 500
#: What `models list` reads of each model: no design (free text, other teams' formats).
LIST_FIELDS = ("id", "name", "task", "ready", "project", "framework", "tags", "system_tags", "uri")
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
    seconds: int, what: str, error: type[BuilderError] = RegistryError
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
            f"ClearML did not answer {what} within {seconds} s",
            hint="check CLEARML_API_HOST, the storage endpoint and the server",
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def configured_host() -> str | None:
    """The API host from CLEARML_API_HOST or clearml.conf, None when neither sets one."""
    host = os.environ.get("CLEARML_API_HOST", "").strip()
    if host:
        return host.rstrip("/")
    from clearml.config import config_obj

    configured = config_obj.get("api.api_server", None) or config_obj.get("api.host", None)
    return str(configured).rstrip("/") if configured else None


class ClearMLRegistry:
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
            from clearml.backend_api.session.client import APIClient
            from clearml.backend_api.session.client.client import StrictSession

            # A short read timeout instead of the SDK's 300 s; it is a private class attribute,
            # so this is process-wide (the builder is the only SDK user in its process).
            StrictSession._session_timeout = (5.0, 10.0)
            session = self._call(
                "login", lambda: StrictSession(host=self.host, http_retries_config=dict(_RETRIES))
            )
            self._client = APIClient(session=session)
        return self._client

    def _call(self, what: str, action: Callable[[], T]) -> T:
        from clearml.backend_api.session.client import APIError
        from clearml.backend_api.session.defs import MissingConfigError
        from clearml.backend_api.session.session import LoginError

        try:
            with sdk_deadline(DEADLINE_SECONDS, what):
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
        except RegistryError:
            raise
        except Exception as exc:  # requests/urllib3 errors after the capped retries
            raise RegistryError(
                f"ClearML at {self.host} failed on {what}: {type(exc).__name__}"
            ) from None

    def get_model(self, model_id: str) -> ModelRecord:
        model_id = check_clearml_id(model_id.strip(), "ClearML model id")
        api = self._api()
        m = self._call(f"models.get_by_id {model_id}", lambda: api.models.get_by_id(model=model_id))
        where = f"ClearML model {model_id}"
        return _model_record(m, where, design=parse_design(m.design, where))

    def get_task(self, task_id: str) -> TaskRecord:
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
        project_id = check_clearml_id(project_id, "ClearML project id")
        found = self._get_all("projects", {"id": [project_id], "only_fields": ["id", "name"]})
        return next((ProjectRef(p.id, p.name or "") for p in found if p.id == project_id), None)

    def _get_all(self, service: str, query: dict[str, Any]) -> list[Any]:
        """Every page of `<service>.get_all` (the server caps a page at 500, default 500).

        Pages are offsets: a record created while paging shifts the rest by one, so ids seen
        on an earlier page are skipped (ordered by creation time, a newcomer lands at the end).
        A full page with nothing new means the server ignores paging: refused, never looped.
        """
        get_all = getattr(self._api(), service).get_all
        out: list[Any] = []
        seen: set[str] = set()
        for page in range(1_000_000):
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
            if len(batch) < PAGE_SIZE:
                break
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
        query: dict[str, Any] = {"system_tags": ["-archived"], "only_fields": list(LIST_FIELDS)}
        if project is not None:
            query["project"] = self._project_ids(project)
        if published is not None:
            query["ready"] = published
        found = self._get_all("models", query)
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
        from clearml.backend_api.session.client import APIError

        api = self._api()
        try:
            with sdk_deadline(DEADLINE_SECONDS, "models.set_ready"):
                api.models.set_ready(model=model_id, publish_task=False)
        except APIError as exc:
            if tuple(exc.codes) == (400, 203):  # "Model is ready": already published
                return False
            raise _api_error(exc, "models.set_ready", self.host) from None
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
    )


def _api_error(exc: Any, what: str, host: str) -> RegistryError:
    codes = tuple(getattr(exc, "codes", ()) or ())
    target = what.split(" ", 1)[-1]
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
    return RegistryError(f"ClearML at {host} answered {code} on {what}")
