"""A faithful emulation of the clearml-server REST endpoints the clearml SDK calls.

See shared/reference/clearml-api.md section 8.1. One threaded stdlib HTTP server on
127.0.0.1: JSON body on GET/POST/PUT, query params merged, unknown body keys ignored, the
full ``meta`` envelope on every answer with HTTP status == ``result_code``, HS256 JWT
login, and in-memory models/tasks/projects seeded by the test.

    emu = ClearMLEmulator().start()
    emu.add_model({"id": "m1", "name": "jet-tagger v3", "task": "t1", "uri": "s3://b/k"})
    emu.set_fault("http503")          # bad_login | http500 | http503 | drop | hang | None
    emu.calls("models.get_by_id")     # the request journal
    emu.stop()

CLI (for subprocess use): ``python -m testbed.clearml_emulator --port P --seed FILE.json``.

Behaviour follows the real server (allegroai/clearml-server 2.0 @ 2976ce69, ``apiserver/``):

* API version, ``service_repo/service_repo.py`` (``_max_version`` per release: 2.9 is
  clearml-server 0.16, 2.13 is 1.0, 2.20 is 1.6, 2.23 is 1.9, 2.31 is 1.17 and 2.0): the login
  token carries ``api_version`` and ``server_version``; ``ClearMLEmulator(api_version="2.20")``
  is an older server (scroll paging, ``schema/services/models.conf`` get_all "2.15", is not
  there before 2.15: its keys are ignored as any unknown key), and records are conformed to
  the version the client asks for (``services/utils.py``: a model's ``metadata`` is ``[]`` up
  to 2.16, a task's ``execution.model`` / ``output.model`` before 2.13);
* paging, ``database/model/base.py::validate_paging`` and ``get_data_with_scroll_support``:
  every get_all is paged; ``page_size`` defaults to and is capped at the server setting
  ``max_page_size`` (``config/default/services/_mongo.conf``: 500; a deployment may lower it,
  ``ClearMLEmulator(max_page_size=100)``; None = no cap, as servers before 1.2); the offset is
  ``page * min(page_size, max_page_size)``; ``page`` without ``page_size`` is a 400;
  ``scroll_id`` + ``size`` continue from a server-side position and return ``scroll_id``
  (``size`` is not capped); ``id`` is appended to every ``order_by`` (stable pages);
* public models, ``services/models.py`` (get_all/get_by_id pass ``allow_public=True``) and
  ``bll/model/__init__.py::get_company_model_by_id``: a record with ``company: ""`` is read by
  every company, but ``models.set_ready`` looks models up in the caller's company only and
  answers 400/201 for it;
* weights packages, clearml SDK 2.1.12 ``model.py::update_weights_package``: system tag
  ``package`` and a ``.zip`` uri (``realistic_seed``);
* imported models, SDK ``InputModel.import_model``: no ``task`` at all (``realistic_seed``);
* records, ``schema/services/models.conf``/``tasks.conf``: ``project`` is a project id,
  ``design`` free text under ``design.design``, ``metadata`` ``{key: {key, type, value}}``,
  ``labels`` ``{name: int}``, ``system_tags`` (``archived``); ``models.get_by_id`` returns
  archived models too (``services/models.py``);
* task deletion, ``bll/task/task_cleanup.py::cleanup_task``: draft output models are deleted,
  published ones keep living with ``task`` = ``__DELETED__<task id>`` (:meth:`delete_task`).

:func:`realistic_seed` builds server-shaped data (hundreds of models, several output models per
task, archived models, free-text designs, a deleted task, ``s3://host:port`` and file-server
URIs); :class:`FileServer` stands in for the ClearML file server (``http://host:8081/...``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt

log = logging.getLogger("testbed.clearml_emulator")

API_VERSION = "2.31"
SERVER_VERSION = "2.0.0"
#: clearml-server release of each API version the SDK ships schemas for (service_repo.py's
#: _max_version at each release tag).
SERVER_OF_API = {"2.9": "0.16.0", "2.13": "1.0.0", "2.20": "1.6.0", "2.23": "1.9.0"}
#: schema/services/models.conf: get_all "2.15" added scroll_id/refresh_scroll/size.
SCROLL_API = "2.15"
SCROLL_KEYS = ("scroll_id", "refresh_scroll", "size")
ACTUAL_VERSION = "2.1"  # min version of the serving implementation; the SDK never reads it
DEFAULT_ACCESS_KEY = "IVDTESTBEDACCESSKEY0"
DEFAULT_SECRET_KEY = "ivd-testbed-secret-key-0123456789abcdef"
TOKEN_LIFETIME = 30 * 24 * 3600
FAULTS = ("bad_login", "http500", "http503", "drop", "hang")
#: config/default/services/_mongo.conf max_page_size: the default and the maximum page size.
MAX_PAGE_SIZE = 500
#: bll/task/utils.py deleted_prefix
DELETED_PREFIX = "__DELETED__"
PATH_RE = re.compile(r"^/?(v(?P<ver>\d+\.\d+)/)?(?P<name>\w+\.\w+)/?$")
#: body keys that steer get_all but are not filters
CONTROL_KEYS = {
    "only_fields", "order_by", "page", "page_size", "method", "search_hidden",
    "shallow_search", "include_stats", "scroll_id", "refresh_scroll", "size", "_start",
    "allow_public", "_allow_extra_fields_", "include_subprojects", "search_text",
}  # fmt: skip
LIST_FILTERS = {"id", "project", "uri", "task", "framework", "status", "type", "user", "parent"}
TASK_TYPES = {
    "training", "testing", "inference", "data_processing", "application", "monitor",
    "controller", "optimizer", "service", "qc", "custom",
}  # fmt: skip
TASK_STATUSES = {
    "created", "queued", "in_progress", "stopped", "published", "publishing", "closed",
    "failed", "completed", "unknown",
}  # fmt: skip

Record = dict[str, Any]


class ApiError(Exception):
    """An error answer: HTTP status == result_code, plus subcode, message and error_data."""

    def __init__(
        self, code: int, subcode: int, msg: str, data: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}/{subcode}: {msg}")
        self.code, self.subcode, self.msg, self.data = code, subcode, msg, dict(data or {})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _get_path(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _tags_match(have: Iterable[str], wanted: Iterable[Any]) -> bool:
    """Server semantics: plain entries are OR-ed, ``-x`` entries exclude."""
    have_set = set(have)
    include = [t for t in wanted if isinstance(t, str) and t and not t.startswith(("-", "__$"))]
    exclude = [t[1:] for t in wanted if isinstance(t, str) and t.startswith("-")]
    if include and not have_set.intersection(include):
        return False
    return not have_set.intersection(exclude)


def _matches(record: Record, query: Mapping[str, Any]) -> bool:
    for key, want in query.items():
        if key in CONTROL_KEYS or want is None:
            continue
        if key == "name":
            if not re.search(str(want), str(record.get("name") or ""), re.IGNORECASE):
                return False
        elif key in ("tags", "system_tags"):
            if not _tags_match(record.get(key) or [], _as_list(want)):
                return False
        elif key == "ready":
            if bool(record.get("ready")) != bool(want):
                return False
        elif key in LIST_FILTERS or "." in key:
            value = record.get(key) if key in LIST_FILTERS else _get_path(record, key)
            if value not in _as_list(want):
                return False
    return True


def _project_fields(record: Record, fields: Iterable[str]) -> Record:
    """only_fields projection (dotted paths allowed); the id is always returned."""
    out: Record = {"id": record["id"]}
    for dotted in fields:
        value = _get_path(record, dotted)
        if value is None:
            continue
        parts = dotted.split(".")
        dst = out
        for part in parts[:-1]:
            dst = dst.setdefault(part, {})
        dst[parts[-1]] = copy.deepcopy(value)
    return out


def _sort_key(field: str) -> Callable[[Record], tuple[int, Any]]:
    def key(rec: Record) -> tuple[int, Any]:
        value = _get_path(rec, field)
        return (0, "") if value is None else (1, value)

    return key


def _paging(query: Mapping[str, Any], max_page_size: int | None) -> tuple[int, int | None]:
    """(start, size) as base.py::validate_paging: page_size defaults to and is capped at
    max_page_size (None: no cap, no default, as before clearml-server 1.2); page alone is
    refused; scroll ``size`` is used, uncapped, when a scroll is active."""
    if "_start" in query:
        return int(query["_start"]), int(query["size"])
    page, page_size = query.get("page"), query.get("page_size")
    if page is not None and (not isinstance(page, int) or page < 0):
        raise ApiError(400, 12, "Validation error (page must be >=0)", {"field": "page"})
    if page_size is not None and (not isinstance(page_size, int) or page_size < 1):
        raise ApiError(400, 12, "Validation error (page_size must be >0)", {"field": "page_size"})
    if max_page_size is None:
        if page is not None and page_size is None:
            raise ApiError(
                400, 11, "Missing required fields (page_size is required when page is requested)",
                {"field": "page_size"},
            )  # fmt: skip
        return (page or 0) * (page_size or 0), page_size
    size = min(page_size if page_size is not None else max_page_size, max_page_size)
    return (page or 0) * size, size


def select(
    records: Iterable[Record], query: Mapping[str, Any], max_page_size: int | None = MAX_PAGE_SIZE
) -> list[Record]:
    """get_all semantics: filter, order_by (``-`` = descending, ``id`` always appended as the
    tie-breaker), paging (default and maximum page size 500), only_fields."""
    found = [r for r in records if _matches(r, query)]
    order = [str(f) for f in _as_list(query.get("order_by") or [])]
    if not any(f in ("id", "-id") for f in order):
        order.append("id")
    for name in reversed(order):
        found.sort(key=_sort_key(name.lstrip("-")), reverse=name.startswith("-"))
    start, size = _paging(query, max_page_size)
    found = found[start : start + size] if size else found
    only = query.get("only_fields")
    return [_project_fields(r, _as_list(only)) if only else copy.deepcopy(r) for r in found]


class ClearMLEmulator:
    """The emulated clearml-server: state, auth, journal and fault modes."""

    def __init__(
        self,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_version: str = API_VERSION,
        company: str = "ivd-testbed-company",
        user: str = "ivd-testbed-user",
        journal_file: Path | None = None,
        max_page_size: int | None = MAX_PAGE_SIZE,
        server_version: str | None = None,
    ) -> None:
        self.access_key, self.secret_key = access_key, secret_key
        self.max_page_size = max_page_size
        self.server_version = server_version or SERVER_OF_API.get(api_version, SERVER_VERSION)
        self._hooks: dict[str, Callable[[Record], None]] = {}
        self._scrolls: dict[str, int] = {}
        self.api_version, self.company, self.user = api_version, company, user
        self.journal_file = journal_file
        self._jwt_secret = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._models: dict[str, Record] = {}
        self._tasks: dict[str, Record] = {}
        self._projects: dict[str, Record] = {}
        self._journal: list[Record] = []
        self._fault: str | None = None
        self._fault_on_login = False
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Value for CLEARML_API_HOST, e.g. http://127.0.0.1:PORT."""
        return f"http://{self._server.server_address[0]!s}:{self.port}"

    def start(self) -> ClearMLEmulator:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="clearml-emulator", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hung requests are released (closed without an answer)."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ClearMLEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- seeding -----------------------------------------------------------------------
    def add_model(self, record: Mapping[str, Any]) -> Record:
        """Add (or replace) a model; fills server defaults; returns the stored copy."""
        now = _now_iso()
        rec: Record = {
            "id": uuid.uuid4().hex, "name": "model", "company": self.company,
            "user": self.user, "created": now, "last_update": now, "tags": [],
            "system_tags": [], "ready": False, "design": {"design": ""}, "labels": {},
            "metadata": {}, **copy.deepcopy(dict(record)),
        }  # fmt: skip
        with self._lock:
            self._models[rec["id"]] = rec
        return copy.deepcopy(rec)

    def add_task(self, record: Mapping[str, Any]) -> Record:
        """Add (or replace) a task; fills server defaults; returns the stored copy."""
        now = _now_iso()
        rec: Record = {
            "id": uuid.uuid4().hex, "name": "task", "company": self.company,
            "user": self.user, "type": "training", "status": "completed", "created": now,
            "last_update": now, "tags": [], "system_tags": [], "hyperparams": {},
            "configuration": {}, "models": {"input": [], "output": []},
            **copy.deepcopy(dict(record)),
        }  # fmt: skip
        if rec["type"] not in TASK_TYPES or rec["status"] not in TASK_STATUSES:
            raise ValueError(f"task {rec['id']}: type/status not in the server enums")
        with self._lock:
            self._tasks[rec["id"]] = rec
        return copy.deepcopy(rec)

    def add_project(self, record: Mapping[str, Any]) -> Record:
        """Add (or replace) a project; fills server defaults; returns the stored copy."""
        now = _now_iso()
        name = str(record.get("name", "project"))
        rec: Record = {
            "id": uuid.uuid4().hex, "name": name, "basename": name.rsplit("/", 1)[-1],
            "description": "", "company": self.company, "user": self.user, "created": now,
            "last_update": now, "tags": [], "system_tags": [], **copy.deepcopy(dict(record)),
        }  # fmt: skip
        with self._lock:
            self._projects[rec["id"]] = rec
        return copy.deepcopy(rec)

    def seed(self, data: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Load {"projects": [...], "tasks": [...], "models": [...]} (each list optional)."""
        for rec in data.get("projects", []):
            self.add_project(rec)
        for rec in data.get("tasks", []):
            self.add_task(rec)
        for rec in data.get("models", []):
            self.add_model(rec)

    def archive_model(self, model_id: str) -> None:
        """What the UI's "Archive" does: add the ``archived`` system tag."""
        with self._lock:
            rec = self._models[model_id]
            if "archived" not in rec["system_tags"]:
                rec["system_tags"] = [*rec["system_tags"], "archived"]

    def delete_model(self, model_id: str) -> None:
        """What models.delete does to the record: it is gone."""
        with self._lock:
            self._models.pop(model_id, None)

    def delete_task(self, task_id: str) -> None:
        """tasks.delete as bll/task/task_cleanup.py::cleanup_task (force, delete_output_models):
        the task goes, its draft models go, its published models stay with
        ``task = "__DELETED__<task id>"``."""
        with self._lock:
            del self._tasks[task_id]
            for model_id, rec in list(self._models.items()):
                if rec.get("task") != task_id:
                    continue
                if rec.get("ready"):
                    rec["task"] = f"{DELETED_PREFIX}{task_id}"
                else:
                    del self._models[model_id]

    def model(self, model_id: str) -> Record | None:
        """A copy of the stored model record, or None."""
        with self._lock:
            rec = self._models.get(model_id)
            return copy.deepcopy(rec) if rec else None

    def task(self, task_id: str) -> Record | None:
        """A copy of the stored task record, or None."""
        with self._lock:
            rec = self._tasks.get(task_id)
            return copy.deepcopy(rec) if rec else None

    # -- journal and faults ------------------------------------------------------------
    @property
    def journal(self) -> list[Record]:
        """Every request so far: {endpoint, version, body, status, subcode, method, fault}."""
        with self._lock:
            return copy.deepcopy(self._journal)

    def calls(self, endpoint: str) -> list[Record]:
        """Journal entries for one endpoint, e.g. "models.set_ready"."""
        return [e for e in self.journal if e["endpoint"] == endpoint]

    def clear_journal(self) -> None:
        """Forget the requests recorded so far."""
        with self._lock:
            self._journal.clear()

    @property
    def unknown_endpoints(self) -> list[str]:
        """Endpoints that were called but are not emulated (answered 404)."""
        return sorted({e["endpoint"] for e in self.journal if e["status"] == 404})

    @property
    def fault(self) -> str | None:
        """The active fault mode, or None."""
        return self._fault

    def set_fault(self, mode: str | None, *, include_login: bool = False) -> None:
        """Inject a fault: bad_login (401/22 on auth.login), http500, http503, drop (close
        the socket unanswered) or hang (never answer until stopped or the fault is cleared).
        Faults other than bad_login hit data calls only unless `include_login` is true."""
        if mode is not None and mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; choose from {', '.join(FAULTS)}")
        self._fault, self._fault_on_login = mode, include_login

    def on_request(self, endpoint: str, hook: Callable[[Record], None] | None) -> None:
        """Call ``hook(body)`` before each ``endpoint`` request is answered (None removes it):
        what other users do to the server meanwhile, e.g. archive a model between two pages."""
        if hook is None:
            self._hooks.pop(endpoint, None)
        else:
            self._hooks[endpoint] = hook

    @contextlib.contextmanager
    def faulted(self, mode: str, *, include_login: bool = False) -> Iterator[None]:
        """Apply a fault for the duration of a with-block, then clear it."""
        self.set_fault(mode, include_login=include_login)
        try:
            yield
        finally:
            self.set_fault(None)

    def reset(self) -> None:
        """Drop all records, the journal, hooks and any fault (the login secret stays valid)."""
        self.set_fault(None)
        self._hooks.clear()
        with self._lock:
            self._models.clear()
            self._tasks.clear()
            self._projects.clear()
            self._journal.clear()

    def _fault_for(self, endpoint: str) -> str | None:
        fault = self._fault
        if fault == "bad_login":
            return fault if endpoint == "auth.login" else None
        if endpoint == "auth.login" and not self._fault_on_login:
            return None
        return fault

    def _record(self, entry: Record) -> None:
        with self._lock:
            self._journal.append(entry)
            if self.journal_file is not None:
                with self.journal_file.open("a") as fh:
                    fh.write(json.dumps(entry, default=str) + "\n")

    # -- request handling --------------------------------------------------------------
    def handle(
        self, method: str, path: str, headers: Mapping[str, str], raw_body: bytes
    ) -> tuple[str, int, Record | None]:
        """Route one request. Returns (endpoint, status, envelope); envelope None = no answer."""
        split = urlsplit(path)
        match = PATH_RE.match(split.path)
        endpoint = match["name"] if match else split.path.strip("/")
        version = match["ver"] if match else None
        entry: Record = {
            "endpoint": endpoint, "version": version, "body": {}, "status": None,
            "subcode": None, "method": method, "fault": None,
        }  # fmt: skip
        try:
            body = self._parse_body(raw_body, split.query)
            entry["body"] = body
            hook = self._hooks.get(endpoint)
            if hook is not None:
                hook(body)
            fault = self._fault_for(endpoint)
            entry["fault"] = fault
            if fault in ("drop", "hang"):
                self._record(entry)
                return endpoint, 0, None
            if fault == "http500":
                raise ApiError(500, 0, "General server error (fault injected by the test bed)")
            if fault == "http503":
                raise ApiError(503, 0, "Service unavailable (fault injected by the test bed)")
            data = self._dispatch(endpoint, version, headers, body, fault)
            status, subcode, msg, error_data = 200, 0, "OK", {}
        except ApiError as err:
            data = {}
            status, subcode, msg, error_data = err.code, err.subcode, err.msg, err.data
        entry["status"], entry["subcode"] = status, subcode
        if status == 404:
            log.warning("clearml emulator: no such endpoint %s (version %s)", endpoint, version)
        self._record(entry)
        call_id = uuid.uuid4().hex
        envelope: Record = {
            "meta": {
                "id": call_id,
                "trx": call_id,
                "endpoint": {
                    "name": endpoint,
                    "requested_version": version or self.api_version,
                    "actual_version": ACTUAL_VERSION,
                },
                "result_code": status,
                "result_subcode": subcode,
                "result_msg": msg,
                "error_stack": None,
                "error_data": error_data,
            },
            "data": data,
        }
        return endpoint, status, envelope

    def wait_released(self) -> None:
        """Block a hung request until the server stops or the hang fault is cleared."""
        while not self._stopping.wait(0.1) and self._fault == "hang":
            pass

    @staticmethod
    def _parse_body(raw: bytes, query: str) -> Record:
        body: Record = {}
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, 0, f"Invalid request body (not JSON): {exc}") from exc
            if not isinstance(parsed, dict):
                raise ApiError(400, 0, "Invalid request body (expected a JSON object)")
            body.update(parsed)
        for key, value in parse_qsl(query, keep_blank_values=True):
            try:
                body[key] = json.loads(value)
            except ValueError:
                body[key] = value
        return body

    def _dispatch(
        self,
        endpoint: str,
        version: str | None,
        headers: Mapping[str, str],
        body: Record,
        fault: str | None,
    ) -> Record:
        handler = _ENDPOINTS.get(endpoint)
        if handler is None or (
            version and _version_tuple(version) > _version_tuple(self.api_version)
        ):
            raise ApiError(
                404, 0, f"Unable to find endpoint for name {endpoint} and version {version}"
            )
        if endpoint == "auth.login":
            return self._login(headers, body, bad=fault == "bad_login")
        self._authenticate(headers)
        requested = version or self.api_version
        if _version_tuple(requested) < _version_tuple(SCROLL_API):
            body = {k: v for k, v in body.items() if k not in SCROLL_KEYS}
        with self._lock:
            return _conform(endpoint, requested, handler(self, body))

    # -- auth --------------------------------------------------------------------------
    def _check_basic(self, value: str) -> None:
        try:
            key, _, secret = base64.b64decode(value).decode().partition(":")
        except ValueError:
            key, secret = "", ""
        if (key, secret) != (self.access_key, self.secret_key):
            raise ApiError(
                401,
                22,
                "Unauthorized (invalid credentials) (failed to locate provided credentials)",
            )

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer":
            try:
                jwt.decode(value.strip(), self._jwt_secret, algorithms=["HS256"])
            except jwt.PyJWTError as exc:
                raise ApiError(
                    401,
                    30,
                    f"Invalid token (invalid jwt token): reason={exc}",
                    {"reason": str(exc)},
                ) from exc
        elif scheme.lower() == "basic":
            self._check_basic(value.strip())
        else:
            raise ApiError(401, 20, "Unauthorized (missing credentials)")

    def _login(self, headers: Mapping[str, str], body: Record, *, bad: bool) -> Record:
        if bad:
            raise ApiError(
                401,
                22,
                "Unauthorized (invalid credentials) (failed to locate provided credentials)",
            )
        self._authenticate(headers)  # Basic key:secret, or a valid Bearer token to refresh
        now = int(time.time())
        lifetime = int(body.get("expiration_sec") or TOKEN_LIFETIME)
        payload = {
            "identity": {
                "company": self.company, "company_name": "IVD test bed", "user": self.user,
                "user_name": "IVD test bed", "role": "user",
            },
            "iat": now, "exp": now + lifetime, "api_version": self.api_version,
            "server_version": self.server_version, "server_build": "", "feature_set": "basic",
            "env": "test", "session_id": uuid.uuid4().hex,
        }  # fmt: skip
        return {"token": jwt.encode(payload, self._jwt_secret, algorithm="HS256")}

    # -- endpoints (called with the state lock held) -------------------------------------
    def _models_get_by_id(self, body: Record) -> Record:
        model_id = str(_required(body, "model")).strip()
        rec = self._models.get(model_id)
        if rec is None:
            raise ApiError(
                400, 201,
                f"Invalid model id (no such public or company model): id={model_id}, "
                f"company={self.company}",
                {"id": model_id, "company": self.company},
            )  # fmt: skip
        return {"model": copy.deepcopy(rec)}

    def _get_all(self, records: Iterable[Record], key: str, body: Record) -> Record:
        """get_all with scroll support (base.py::get_data_with_scroll_support)."""
        query = dict(body)
        scroll_id = query.get("scroll_id")
        if "scroll_id" in query:
            size = query.get("size")
            if not isinstance(size, int) or size < 1:
                raise ApiError(
                    400, 12,
                    "Validation error (Integer size parameter greater than 1 should be provided "
                    "when working with scroll)",
                )  # fmt: skip
            scroll_id = scroll_id or uuid.uuid4().hex
            position = self._scrolls.get(scroll_id, 0)
            if query.get("refresh_scroll"):
                query["size"], position = max(position, size), 0
            query["_start"] = position
        found = select(records, query, self.max_page_size)
        out: Record = {key: found}
        if "scroll_id" in query:
            self._scrolls[str(scroll_id)] = int(query["_start"]) + len(found)
            out["scroll_id"] = scroll_id
        return out

    def _models_get_all(self, body: Record) -> Record:
        return self._get_all(self._models.values(), "models", body)

    def _models_set_ready(self, body: Record) -> Record:
        model_id = str(_required(body, "model")).strip()
        rec = self._models.get(model_id)
        if rec is None:
            raise ApiError(
                400, 201, f"Invalid model id: company={self.company}, id={model_id}",
                {"company": self.company, "id": model_id},
            )  # fmt: skip
        if rec.get("company") != self.company:  # get_company_model_by_id: no public models
            raise ApiError(
                400, 201, f"Invalid model id: company={self.company}, id={model_id}",
                {"company": self.company, "id": model_id},
            )  # fmt: skip
        if rec.get("ready"):
            raise ApiError(
                400, 203, f"Model is ready: company={self.company}, model={model_id}",
                {"company": self.company, "model": model_id},
            )  # fmt: skip
        now = _now_iso()
        rec.update(ready=True, last_update=now, last_change=now)
        result: Record = {"updated": 1}
        task = self._tasks.get(str(rec.get("task") or ""))
        if body.get("publish_task", True) and task and task.get("status") != "published":
            task.update(status="published", published=now, last_update=now)
            result["published_task"] = {
                "id": task["id"],
                "data": {"updated": 1, "fields": {"status": "published", "published": now}},
            }
        return result

    def _tasks_get_by_id(self, body: Record) -> Record:
        task_id = str(_required(body, "task")).strip()
        rec = self._tasks.get(task_id)
        if rec is None:
            raise ApiError(400, 101, f"Invalid task id: ids=({task_id})", {"ids": [task_id]})
        return {"task": copy.deepcopy(rec)}

    def _tasks_get_all(self, body: Record) -> Record:
        return self._get_all(self._tasks.values(), "tasks", body)

    def _projects_get_all(self, body: Record) -> Record:
        return self._get_all(self._projects.values(), "projects", body)


def _conform(endpoint: str, version: str, data: Record) -> Record:
    """Records as the server answers an older client (services/utils.py): models' ``metadata``
    is ``[]`` up to 2.16 (``unescape_metadata``, the old list schema); tasks get
    ``execution.model`` / ``output.model`` before 2.13 (``ModelsBackwardsCompatibility``)."""
    service = endpoint.split(".", 1)[0]
    records = data.get("models") or ([data["model"]] if "model" in data else [])
    tasks = data.get("tasks") or ([data["task"]] if "task" in data else [])
    if service == "models" and _version_tuple(version) <= (2, 16):
        for rec in records:
            if "metadata" in rec:
                rec["metadata"] = []
    if service == "tasks" and _version_tuple(version) < (2, 13):
        for rec in tasks:
            models = rec.get("models") or {}
            if models.get("input"):
                rec.setdefault("execution", {})["model"] = models["input"][0].get("model")
            if models.get("output"):
                rec.setdefault("output", {})["model"] = models["output"][-1].get("model")
    return data


def _required(body: Mapping[str, Any], key: str) -> Any:
    if body.get(key) in (None, ""):
        raise ApiError(
            400, 12, f"Validation error (error for field '{key}'. field is required!)", {}
        )
    return body[key]


_ENDPOINTS: dict[str, Callable[[ClearMLEmulator, Record], Record]] = {
    "auth.login": lambda emu, body: {},  # handled in _dispatch (needs the headers)
    "models.get_by_id": ClearMLEmulator._models_get_by_id,
    "models.get_all": ClearMLEmulator._models_get_all,
    "models.set_ready": ClearMLEmulator._models_set_ready,
    "tasks.get_by_id": ClearMLEmulator._tasks_get_by_id,
    "tasks.get_all": ClearMLEmulator._tasks_get_all,
    "projects.get_all": ClearMLEmulator._projects_get_all,
}


def _make_handler(emu: ClearMLEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # idle keep-alive connections are closed after this
        server_version = "clearml-emulator/" + SERVER_VERSION

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            _endpoint, status, envelope = emu.handle(self.command, self.path, headers, raw)
            if envelope is None:  # drop / hang: close the socket without an answer
                if emu.fault == "hang":
                    emu.wait_released()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            payload = json.dumps(envelope, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


class FileServer:
    """The ClearML file server as the SDK meets it: ``GET {files_host}/<path>`` answers the
    file's bytes (404 otherwise). Models trained without an ``output_uri`` land here
    (``http(s)://files-host:8081/<project>/<task name>.<task id>/models/<file>``).

        files = FileServer(root).start(); files.url  # -> http://127.0.0.1:PORT
        files.fault = "http503"  # or "hang" (no answer until stopped), None to serve again
    """

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.fault: str | None = None
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, *, body: bool) -> None:
                path = urlsplit(self.path).path
                server.requests.append((self.command, path))
                if server.fault == "hang":
                    while server.fault == "hang" and not server._stopping.wait(0.1):
                        pass
                    self.close_connection = True
                    return
                if server.fault == "http503":
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = (server.root / path.lstrip("/")).resolve()
                inside = target.is_relative_to(server.root.resolve())
                data = target.read_bytes() if inside and target.is_file() else None
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("files %s " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Value for CLEARML_FILES_HOST / api.files_server."""
        return f"http://{self._server.server_address[0]!s}:{self._server.server_address[1]}"

    def start(self) -> FileServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hung requests are released."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def _hex_ids(seed: int) -> Callable[[], str]:
    import random

    rng = random.Random(seed)
    return lambda: f"{rng.getrandbits(128):032x}"


#: Designs other teams keep in ClearML: not every design is HOCON/JSON.
FREE_TEXT_DESIGNS = (
    'name: "ResNet-50"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "data"\n}\n',
    "trained on the 2026-10 export; see the wiki page for the augmentation notes :)\n",
    "",
)


def realistic_seed(
    *,
    models: int = 600,
    seed: int = 14,
    s3_host: str = "minio.example.com:9000",
    files_host: str = "https://files.example.com:8081",
) -> dict[str, list[Record]]:
    """Server-shaped data: 32-hex ids, three projects (one of another team), tasks with one to
    three output models, ``metadata`` as ``{key: {key, type, value}}``, ``labels``, every 7th
    model archived, free-text designs, ``s3://host:port``, file-server, plain s3, gs and azure
    URIs, one deleted task (its published models' ``task`` is ``__DELETED__<id>``), every 11th
    model a weights package (system tag ``package``, ``model_package.zip``), every 13th an
    imported model (no ``task``) and every 17th a public one (``company`` "")."""
    new_id = _hex_ids(seed)
    projects = [
        {"id": new_id(), "name": name, "basename": name.rsplit("/", 1)[-1]}
        for name in ("pathology/breast", "pathology/prostate", "radiology/ct")
    ]
    tasks: list[Record] = []
    out_models: list[Record] = []
    base = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    while len(out_models) < models:
        project = projects[len(tasks) % len(projects)]
        task: Record = {
            "id": new_id(), "name": f"train {project['basename']} #{len(tasks)}",
            "type": "training", "status": ("completed", "published", "failed")[len(tasks) % 3],
            "project": project["id"], "models": {"input": [], "output": []},
        }  # fmt: skip
        tasks.append(task)
        for k in range(1 + len(tasks) % 3):
            n = len(out_models)
            if n >= models:
                break
            model_id = new_id()
            name = f"{project['basename']} model {n}"
            uri = (
                f"s3://{s3_host}/clearml-models/{project['basename']}/{task['name']}.{task['id']}/models/m{k}.onnx",
                f"{files_host}/{project['name']}/{task['name']}.{task['id']}/models/m{k}.onnx",
                f"s3://training-artifacts/{task['id']}/models/m{k}.onnx",
                f"gs://clearml-models/{task['id']}/m{k}.onnx",
                f"azure://acct.blob.core.windows.net/models/{task['id']}/m{k}.onnx",
            )[n % 5]
            design = (
                json.dumps({"params": {"file": f"m{k}.onnx", "tile_size": 224, "mpp": 0.5}})
                if project["basename"] != "ct"
                else FREE_TEXT_DESIGNS[n % len(FREE_TEXT_DESIGNS)]
            )
            created = datetime.fromtimestamp(base + n * 60, UTC).isoformat()
            system_tags = ["archived"] if n % 7 == 3 else []
            if n % 11 == 5:  # model.py::update_weights_package: a zip named model_package.zip
                uri = uri.rsplit("/", 1)[0] + "/model_package.zip"
                system_tags.append("package")
            record: Record = {
                "id": model_id, "name": name, "task": task["id"], "project": project["id"],
                "uri": uri, "ready": n % 2 == 0, "framework": "ONNX",
                "tags": ["candidate"] if n % 2 else ["production"],
                "system_tags": system_tags,
                "design": {"design": design},
                "labels": {"background": 0, "tumour": 1},
                "metadata": {
                    "stain": {"key": "stain", "type": "str", "value": "H&E"},
                    "auc": {"key": "auc", "type": "float", "value": f"0.{900 + n % 90}"},
                },
                "created": created, "last_update": created,
            }  # fmt: skip
            if n % 17 == 8:
                record["company"] = ""  # public: every company reads it
            out_models.append(record)
            if n % 13 == 6:
                del record["task"]  # imported (InputModel.import_model): no creating task
            else:
                task["models"]["output"].append({"name": name, "model": model_id})
    deleted = tasks[1]  # two outputs: one published (kept, re-pointed), one draft (gone)
    kept = []
    for rec in out_models:
        if rec.get("task") == deleted["id"]:
            if not rec["ready"]:
                continue
            rec["task"] = f"{DELETED_PREFIX}{deleted['id']}"
        kept.append(rec)
    tasks.remove(deleted)
    return {"projects": projects, "tasks": tasks, "models": kept}


def main(argv: list[str] | None = None) -> int:
    """CLI: serve until SIGTERM/SIGINT; prints the URL on its first line of output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=Path, help='JSON: {"models": [...], "tasks": [...]}')
    parser.add_argument(
        "--realistic", type=int, metavar="N", help="seed N server-shaped models (realistic_seed)"
    )
    parser.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--api-version", default=API_VERSION)
    parser.add_argument(
        "--max-page-size", type=int, default=MAX_PAGE_SIZE, help="the server's page cap; 0: none"
    )
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--journal", type=Path, help="append every request as JSON lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    emu = ClearMLEmulator(
        args.access_key, args.secret_key, host=args.host, port=args.port,
        api_version=args.api_version, journal_file=args.journal,
        max_page_size=args.max_page_size or None,
    )  # fmt: skip
    if args.realistic:
        emu.seed(realistic_seed(models=args.realistic))
    if args.seed:
        emu.seed(json.loads(args.seed.read_text()))
    emu.set_fault(args.fault)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    emu.start()
    print(emu.url, flush=True)
    done.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
