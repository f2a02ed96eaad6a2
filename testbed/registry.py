"""A CNCF distribution registry (Debian ``docker-registry``) on a free 127.0.0.1 port.

Storage is a private temp dir, deletes are enabled, and auth is off unless
``start_registry(auth=True)`` (htpasswd basic auth; ``htpasswd`` comes from apache2-utils).
The registry's access log is parsed so tests can count what was sent, e.g. that a
rebuild uploaded no blob: ``reg.blob_uploads(since=mark)`` with ``mark = len(reg.requests())``.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testbed._util import (
    Service,
    ServiceError,
    ensure_command,
    free_port,
    spawn,
    stop_process,
    wait_until,
)

START_TIMEOUT = 30.0
BLOB_UPLOAD = re.compile(r"^/v2/.+/blobs/uploads/")
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
MANIFEST = re.compile(r"^/v2/.+/manifests/[^/]+$")


@dataclass(frozen=True)
class RegistryRequest:
    """One request the registry answered, from its log."""

    method: str
    path: str  # request URI, query included
    status: int


@dataclass
class Registry(Service):
    """A running registry we started; stop() removes its storage."""

    host: str  # "127.0.0.1:PORT", as used in image references
    root: Path
    username: str | None = None
    password: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:5000."""
        return f"http://{self.host}"

    @property
    def log(self) -> Path:
        """The registry's JSON application log (stderr)."""
        return self.root / "registry.log"

    def auth_config(self) -> dict[str, str] | None:
        """docker SDK auth_config for push/pull, or None without auth."""
        if self.username is None or self.password is None:
            return None
        return {"username": self.username, "password": self.password}

    @property
    def access_log(self) -> Path:
        """The registry's access log (combined log format, stdout)."""
        return self.root / "access.log"

    def requests(self) -> list[RegistryRequest]:
        """Every request answered so far, in order (from the access log)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except OSError:
            return []
        return [
            RegistryRequest(method=m["method"], path=m["path"], status=int(m["status"]))
            for m in ACCESS_LINE.finditer(text)
        ]

    def blob_uploads(self, since: int = 0) -> list[RegistryRequest]:
        """POST/PATCH/PUT requests on /v2/<name>/blobs/uploads/ (after the first `since`)."""
        return [
            r
            for r in self.requests()[since:]
            if r.method in {"POST", "PATCH", "PUT"} and BLOB_UPLOAD.match(r.path)
        ]

    def manifest_puts(self, since: int = 0) -> list[RegistryRequest]:
        """PUT requests on /v2/<name>/manifests/<ref> (after the first `since`)."""
        return [r for r in self.requests()[since:] if r.method == "PUT" and MANIFEST.match(r.path)]

    def answers(self) -> bool:
        """True if GET /v2/ answers 200 (or 401 when auth is on)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError as exc:
            return exc.code == 401 and self.username is not None
        except OSError:
            return False

    def basic_auth_header(self) -> dict[str, str]:
        """Authorization header for raw HTTP calls (empty without auth)."""
        if self.username is None or self.password is None:
            return {}
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def stop(self) -> None:
        """Stop the registry and delete its storage."""
        if self._proc is not None:
            stop_process(self._proc, timeout=15)
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)


def _htpasswd_line(user: str, password: str) -> str:
    htpasswd = ensure_command("htpasswd", "apache2-utils")
    done = subprocess.run(
        [htpasswd, "-nbB", user, password], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip() + "\n"


def start_registry(auth: bool = False, timeout: float = START_TIMEOUT) -> Registry:
    """Start docker-registry on 127.0.0.1 (installing it if needed) and wait for /v2/."""
    binary = ensure_command("docker-registry", "docker-registry")
    root = Path(tempfile.mkdtemp(prefix="ivd-registry-"))
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
    }
    secret = secrets.token_hex(16)
    user = password = None
    if auth:
        user, password = "ivd-testbed", secrets.token_urlsafe(12)
        (root / "htpasswd").write_text(_htpasswd_line(user, password))
        config["auth"] = {"htpasswd": {"realm": "ivd-testbed", "path": str(root / "htpasswd")}}
    last_error: ServiceError | None = None
    for _attempt in range(3):  # the free port may be taken between probe and bind
        host = f"127.0.0.1:{free_port()}"
        config["http"] = {"addr": host, "secret": secret}
        (root / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        reg = Registry(host=host, root=root, username=user, password=password)
        reg.log.unlink(missing_ok=True)
        reg.access_log.unlink(missing_ok=True)
        reg._proc = spawn(
            [binary, "serve", str(root / "config.yml")], reg.log, stdout=reg.access_log
        )
        try:
            wait_until(
                reg.answers, timeout=timeout, what="docker-registry", proc=reg._proc, log=reg.log
            )
            return reg
        except ServiceError as exc:
            last_error = exc
            if reg._proc is not None:
                stop_process(reg._proc, timeout=5)
    shutil.rmtree(root, ignore_errors=True)
    raise last_error or ServiceError("docker-registry did not start")
