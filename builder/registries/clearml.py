"""The ClearML backend, through the real clearml SDK, with its retry traps capped.

The SDK's defaults retry an unreachable server for hours, and its high-level ``Model``/``Task``
objects loop forever on connection errors (clearml/clearml#852). So: the bounded ``APIClient``
over a ``StrictSession`` with small retry counts and short timeouts, a hard deadline around every
call, and no call at all without an explicitly configured API host.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from builder.errors import RegistryError
from builder.registries import ModelRecord, TaskRecord, parse_design

T = TypeVar("T")

#: Seconds any single registry call may take, retries included.
DEADLINE_SECONDS = 15
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
def _deadline(seconds: int, what: str) -> Iterator[None]:
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
        raise RegistryError(
            f"ClearML did not answer {what} within {seconds} s",
            hint="check CLEARML_API_HOST and the server",
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
            with _deadline(DEADLINE_SECONDS, what):
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
        model_id = model_id.strip()
        api = self._api()
        m = self._call(f"models.get_by_id {model_id}", lambda: api.models.get_by_id(model=model_id))
        where = f"ClearML model {model_id}"
        return ModelRecord(
            id=m.id,
            name=m.name or "",
            task=m.task or "",
            uri=m.uri or "",
            ready=bool(m.ready),
            framework=m.framework,
            tags=tuple(m.tags or ()),
            project=m.project,
            design=parse_design(m.design, where),
        )

    def get_task(self, task_id: str) -> TaskRecord:
        api = self._api()
        t = self._call(f"tasks.get_by_id {task_id}", lambda: api.tasks.get_by_id(task=task_id))
        status = t.status.value if hasattr(t.status, "value") else str(t.status)
        return TaskRecord(id=t.id, name=t.name or "", status=status, project=t.project)

    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]:
        api = self._api()
        query: dict[str, Any] = {
            "system_tags": ["-archived"],
            "order_by": ["-created"],
            "page": 0,
            "page_size": 500,
        }
        if project is not None:
            query["project"] = [project]
        if published is not None:
            query["ready"] = published
        found = self._call("models.get_all", lambda: api.models.get_all(**query))
        return [self.get_model(m.id) for m in found]

    def mark_published(self, model_id: str) -> bool:
        from clearml.backend_api.session.client import APIError

        api = self._api()
        try:
            with _deadline(DEADLINE_SECONDS, "models.set_ready"):
                api.models.set_ready(model=model_id, publish_task=False)
        except APIError as exc:
            if tuple(exc.codes) == (400, 203):  # "Model is ready": already published
                return False
            raise _api_error(exc, "models.set_ready", self.host) from None
        return True


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
