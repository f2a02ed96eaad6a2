"""The registry transport: one :class:`RegistryClient` per registry, with retries and credentials.

Registry traffic goes through oras-py (``oras.provider.Registry``): its auth backends (Docker
config, credential helpers, bearer-token and basic challenges), reference parsing, paginated
tag listing and blob HEAD. What it lacks is done here on top of its session, each in a small
commented function: bounded retries with backoff and timeouts, streaming monolithic uploads
with progress, cross-repository mounts, and manifest GET/PUT of exact bytes (digests are over
bytes, and oras-py re-serialises manifests).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import oras.auth
import oras.container
import oras.provider
import requests

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.oci.blobs import BlobStore
from builder.oci.descriptor import MANIFEST_ACCEPT, OCI_INDEX, sha256_digest
from builder.oci.reference import use_plain_http

_RETRY_STATUSES: Final = frozenset({500, 502, 503, 504, 429})
_CHUNK: Final = 1 << 20
#: A registry that could not be reached is not asked again for this long (seconds): a build
#: that falls back to the local image store says so at once instead of retrying each time.
UNREACHABLE_TTL: Final = 60.0
#: The first request to a registry (GET /v2/) is tried this often when it gets no connection,
#: waiting this long to connect: "connection refused" is an answer, not a slow network.
PROBE_ATTEMPTS: Final = 2
PROBE_CONNECT_TIMEOUT: Final = 3.0
PROBE_READ_TIMEOUT: Final = 15.0  # GET /v2/ is a few bytes, even from a busy registry


# oras-py logs through the "oras" logger; as a library we add no output of our own: the
# application decides where log records go (without handlers Python prints warnings).
logging.getLogger("oras").addHandler(logging.NullHandler())


# -- the registry client -------------------------------------------------------------------------


class _Unreachable:
    """Registries that did not answer lately, remembered for :data:`UNREACHABLE_TTL` in this
    process, and across commands (a file per host in the user cache) when they timed out:
    the one slow answer (a refused connection costs milliseconds to learn again)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str]] = {}

    @staticmethod
    def _file(host: str) -> Path:
        import platformdirs

        name = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
        return Path(platformdirs.user_cache_path("ivd-builder")) / "unreachable-registries" / name

    def get(self, host: str) -> str | None:
        """Why ``host`` was unreachable and how long ago, if within the TTL."""
        when, reason = self._seen.get(host, (0.0, ""))
        if not reason:
            try:
                path = self._file(host)
                when, reason = path.stat().st_mtime, path.read_text("utf-8").strip()
            except OSError:
                return None
        age = time.time() - when
        return f"{reason} {age:.0f} s ago" if reason and 0 <= age < UNREACHABLE_TTL else None

    def remember(self, host: str, reason: str) -> None:
        self._seen[host] = (time.time(), reason)
        if reason == "timed out":
            try:
                path = self._file(host)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(reason + "\n", "utf-8")
            except OSError:
                pass  # a cache only

    def forget(self, host: str) -> None:
        if self._seen.pop(host, None) is not None or self.get(host):
            self._file(host).unlink(missing_ok=True)


_UNREACHABLE = _Unreachable()


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, and per-request timeouts (seconds).

    Like the ClearML calls: a stalled registry (it accepts the connection, then says nothing)
    costs at most ``deadline`` plus one timeout, not ``attempts`` full timeouts: a request
    that timed out is tried again only while ``deadline`` seconds have not passed since its
    first try. ``read_timeout`` bounds the wait for an answer, ``transfer_timeout`` a silence
    while a blob streams. Refused connections and 5xx answers are retried ``attempts`` times.
    """

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    transfer_timeout: float = 120.0
    deadline: float = 60.0

    def delay(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    def retry_timeout(self, attempt: int, started: float) -> bool:
        """Whether a request that timed out on try ``attempt`` (first try at monotonic time
        ``started``) is tried again."""
        return attempt < self.attempts and time.monotonic() - started < self.deadline


class _TimeoutSession(requests.Session):
    """A session whose requests always time out: oras-py passes no timeout anywhere."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(  # type: ignore[override]
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().request(method, url, *args, **kwargs)


class _Oras(oras.provider.Registry):  # type: ignore[misc]
    """oras-py's Registry with a request method that can be retried safely.

    oras-py's own ``do_request`` retries (only HTTP 500) through a decorator that sleeps up to
    81 s, cannot be bounded per call, and re-sends request bodies already consumed. This
    override keeps its authentication round (401/403 -> ask the auth backend -> resend once)
    and leaves retrying to :class:`RegistryClient`, which knows what can be repeated.
    """

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
        timeout: tuple[float, float] | None = None,
    ) -> requests.Response:
        session: requests.Session = self.session

        def send(headers: dict[str, str]) -> requests.Response:
            return session.request(
                method,
                url,
                data=data,
                json=json,
                headers=headers,
                stream=stream,
                verify=self._tls_verify,
                timeout=timeout,  # None: the session's (the client's read timeout)
            )

        response = send({**(headers or {}), **self._auth_header()})
        if response.status_code not in (401, 403):
            return response
        # A token we already sent was refused (expired, or too narrow a scope): get a new one.
        refresh = response.status_code == 403 or bool(getattr(self.auth, "token", None))
        retry_headers, changed = self.auth.authenticate_request(
            response, dict(headers or {}), refresh=refresh
        )
        if not changed:
            return response
        response.close()
        return send(retry_headers)

    def _auth_header(self) -> dict[str, str]:
        # Basic credentials go on every request up front: a streamed upload body cannot be
        # sent twice, and the 401 round trip would consume it.
        if isinstance(self.auth, oras.auth.BasicAuth):
            if getattr(self.auth, "_basic_auth", None):
                return dict(self.auth.get_auth_header())
            return {}
        if getattr(self.auth, "token", None):
            return dict(self.auth.get_auth_header())
        return {}

    def _check_200_response(self, response: requests.Response) -> None:
        # oras-py raises a bare ValueError naming the URL; keep the status for our message.
        if response.status_code not in (200, 201, 202):
            raise _HTTPError(response)


class BlobUnknownError(ImageError):
    """A manifest refused because a blob it names is not in the repository (the OCI
    distribution spec's ``MANIFEST_BLOB_UNKNOWN``): the pusher's idea of what is there was
    wrong, and checking every blob fixes it."""


#: Error codes of a manifest naming a blob the repository lacks (distribution, OCI spec).
_BLOB_UNKNOWN: Final = frozenset({"MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN"})


class _HTTPError(Exception):
    """A registry answer we did not expect (status kept for the message)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _docker_config() -> dict[str, Any] | None:
    """The Docker client config holding credentials: $DOCKER_CONFIG/config.json, else ~/.docker.

    Returned in the shape oras-py keeps (auths, credsStore, credHelpers); None if absent.
    """
    directory = os.environ.get("DOCKER_CONFIG")
    path = Path(directory) if directory else Path.home() / ".docker"
    try:
        data = json.loads((path / "config.json").read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read the Docker config {path / 'config.json'}: {exc}") from None
    if not isinstance(data, dict):
        raise ImageError(f"{path / 'config.json'} is not a JSON object")
    return {
        "auths": dict(data.get("auths") or {}),
        "credsStore": data.get("credsStore"),
        "credHelpers": dict(data.get("credHelpers") or {}),
    }


class RegistryClient:
    """One registry (``host[:port]``), spoken to through oras-py plus the pieces it lacks.

    Credentials, in order: ``credentials=(user, password)``; ``ORAS_USER``/``ORAS_PASS``; the
    Docker client config (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``,
    including ``credHelpers``/``credsStore``). They are never put in messages.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool | None = None,
        retry: RetryPolicy | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host = host
        self.retry = retry or RetryPolicy()
        self.plain_http = use_plain_http(host, insecure)
        self.base_url = f"{'http' if self.plain_http else 'https'}://{host}"
        session = _TimeoutSession((self.retry.connect_timeout, self.retry.read_timeout))
        challenge = self._probe(session)
        scheme = challenge.split(" ", 1)[0].lower() if challenge else ""
        self._oras = _Oras(
            hostname=host,
            insecure=self.plain_http,
            auth_backend="basic" if scheme == "basic" else "token",
        )
        # Share one timed session between the client and its auth backend (token requests).
        session.cookies.set_policy(self._oras.session.cookies.get_policy())
        self._oras.session = session
        self._oras.auth.session = session
        self._load_credentials(credentials)
        if scheme == "basic" and not getattr(self._oras.auth, "_basic_auth", None):
            raise ImageError(
                f"registry {host} requires a login and no credentials were found",
                hint=f"run `docker login {host}`, set DOCKER_CONFIG, or ORAS_USER/ORAS_PASS",
            )

    # -- plumbing --------------------------------------------------------------------------

    def _probe(self, session: requests.Session) -> str:
        """GET /v2/ once: fail early if unreachable, and learn the auth scheme.

        A registry that gets no connection is tried :data:`PROBE_ATTEMPTS` times with a short
        connect timeout, then remembered as unreachable for a minute (see _Unreachable), so a
        command that falls back to the local image store does not wait on retries.
        """
        known = _UNREACHABLE.get(self.host)
        if known:
            raise ImageError(
                f"cannot reach registry {self.host}: {known} (GET /v2/; asked again after "
                f"{UNREACHABLE_TTL:.0f} s)"
            )
        url = f"{self.base_url}/v2/"
        timeout = (
            min(self.retry.connect_timeout, PROBE_CONNECT_TIMEOUT),
            min(self.retry.read_timeout, PROBE_READ_TIMEOUT),
        )
        attempts = min(PROBE_ATTEMPTS, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            try:
                response = session.get(url, timeout=timeout)
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == attempts or isinstance(exc, requests.exceptions.SSLError):
                    _UNREACHABLE.remember(self.host, _reason(exc))
                    raise ImageError(
                        f"cannot reach registry {self.host}: {_reason(exc)} "
                        f"(GET /v2/, {attempt} attempt{'s' if attempt > 1 else ''})"
                    ) from None
                time.sleep(0.1)
        if response.status_code in _RETRY_STATUSES:  # reached, but busy: the usual retries
            response.close()
            response = self._retrying(lambda: session.get(url), "GET", "/v2/")
        _UNREACHABLE.forget(self.host)
        response.close()
        if response.status_code == 401:
            return str(response.headers.get("Www-Authenticate", ""))
        if response.status_code != 200:
            raise ImageError(
                f"{self.base_url} does not look like an OCI registry "
                f"(GET /v2/ answered {response.status_code} {response.reason})"
            )
        return ""

    def _load_credentials(self, credentials: tuple[str, str] | None) -> None:
        auth = self._oras.auth
        if credentials is None and os.environ.get("ORAS_USER") and os.environ.get("ORAS_PASS"):
            credentials = (os.environ["ORAS_USER"], os.environ["ORAS_PASS"])
        if credentials is not None:
            auth.set_basic_auth(*credentials)
            return
        config = _docker_config()
        if config is not None:
            # oras-py's loader always merges ~/.docker/config.json, in no defined order; like the
            # docker CLI we read only $DOCKER_CONFIG when it is set. Handing oras-py the parsed
            # config keeps its lookup (host aliases, credHelpers, credsStore) for the rest.
            auth._auth_config = config
            auth.load_configs(oras.container.Container("x", registry=self.host))

    def _url(self, path: str, kind: str, ref: str, query: Mapping[str, str] | None = None) -> str:
        url = f"{self.base_url}/v2/{path}/{kind}/{ref}"
        return f"{url}?{urlencode(dict(query))}" if query else url

    def _transfer(self) -> tuple[float, float]:
        """The timeouts of a blob's body: a silence of ``transfer_timeout`` is a stall."""
        return (self.retry.connect_timeout, self.retry.transfer_timeout)

    def _stalled(
        self, exc: Exception, attempt: int, started: float, method: str, what: str
    ) -> ImageError | None:
        """The one-line error ending the retries after ``exc`` on try ``attempt``, or None to
        try again: a timeout within the deadline, another transport failure within the
        attempts (a TLS failure will not heal by itself)."""
        if isinstance(exc, requests.Timeout):
            if self.retry.retry_timeout(attempt, started):
                return None
            return ImageError(
                f"registry {self.host} did not answer {method} {what} within "
                f"{time.monotonic() - started:.0f} s ({attempt} attempts)",
                hint="is the registry up and not overloaded? try again later",
            )
        if attempt < self.retry.attempts and not isinstance(exc, requests.exceptions.SSLError):
            return None
        return ImageError(
            f"cannot reach registry {self.host}: {_reason(exc)} ({method} {what}, "
            f"{attempt} attempts)"
        )

    def _retrying(
        self, call: Callable[[], requests.Response], method: str, what: str
    ) -> requests.Response:
        """Run ``call`` with bounded retries on connection errors, timeouts and 5xx/429."""
        policy = self.retry
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                response = call()
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = self._stalled(exc, attempt, started, method, what)
                if error is not None:
                    raise error from None
            else:
                if response.status_code not in _RETRY_STATUSES or attempt == policy.attempts:
                    return response
                response.close()
            time.sleep(policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
        retry: bool = True,
        timeout: tuple[float, float] | None = None,
    ) -> requests.Response:
        """One registry request through oras-py's authentication, retried if allowed."""

        def call() -> requests.Response:
            return self._oras.do_request(
                url, method, data=data, headers=dict(headers or {}), stream=stream, timeout=timeout
            )

        return self._call(call, method, urlsplit(url).path, retry=retry)

    def _call(
        self, call: Callable[[], requests.Response], method: str, what: str, *, retry: bool = True
    ) -> requests.Response:
        """Run one request (retried if allowed), mapping transport failures to ImageError."""
        try:
            return self._retrying(call, method, what) if retry else call()
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ImageError(
                f"cannot reach registry {self.host}: {_reason(exc)} ({method} {what})"
            ) from None
        except requests.RequestException as exc:
            raise ImageError(
                f"registry {self.host}: {method} {what} failed: {type(exc).__name__}"
            ) from None

    def _fail(
        self, response: requests.Response, action: str, *, attempts: int | None = None
    ) -> ImageError:
        """The one-line error for an unexpected registry answer (never any header or secret)."""
        status = response.status_code
        detail = _registry_error_detail(response)
        retried = attempts and attempts > 1 and status in _RETRY_STATUSES
        tried = f" after {attempts} attempts" if retried else ""
        if status == 401:
            return ImageError(
                f"registry {self.host} rejected the credentials ({action}): "
                f"401 Unauthorized{detail}",
                hint=f"check `docker login {self.host}` / DOCKER_CONFIG / ORAS_USER and ORAS_PASS",
            )
        if status == 403:
            return ImageError(
                f"registry {self.host} denied access ({action}): 403 Forbidden{detail}"
            )
        return ImageError(
            f"registry {self.host}: {action} failed{tried}: {status} {response.reason}{detail}"
        )

    # -- read --------------------------------------------------------------------------------

    def list_tags(self, path: str) -> list[str]:
        """All tags of repository ``path`` (oras-py ``get_tags`` follows the pagination links)."""
        container = oras.container.Container(path, registry=self.host)
        policy = self.retry
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                return [str(tag) for tag in self._oras.get_tags(container)]
            except _HTTPError as exc:
                status = exc.response.status_code
                if status == 404:
                    raise ImageError(f"registry {self.host} has no repository {path}") from None
                if status not in _RETRY_STATUSES or attempt == policy.attempts:
                    raise self._fail(
                        exc.response, f"listing tags of {path}", attempts=attempt
                    ) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = self._stalled(exc, attempt, started, "GET", f"/v2/{path}/tags/list")
                if error is not None:
                    raise error from None
            time.sleep(policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def get_manifest(self, path: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of manifest ``ref`` (tag or digest), digest verified."""
        found = self.find_manifest(path, ref)
        if found is None:
            raise ImageError(f"registry {self.host} has no manifest {path}:{ref}")
        return found

    def find_manifest(self, path: str, ref: str) -> tuple[bytes, str, str] | None:
        """:meth:`get_manifest`, or None when there is no such manifest: one GET where a
        HEAD then a GET would be two round trips."""
        response = self._request(
            "GET", self._url(path, "manifests", ref), headers={"Accept": ", ".join(MANIFEST_ACCEPT)}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"fetching manifest {path}:{ref}")
        raw = response.content
        digest = sha256_digest(raw)
        if ref.startswith("sha256:") and digest != ref:
            raise ImageError(
                f"registry {self.host} served manifest {path}@{ref} with digest {digest}"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type, digest

    def manifest_digest(self, path: str, ref: str) -> str | None:
        """Digest the tag ``ref`` points to now, or None if there is no such tag."""
        response = self._request(
            "HEAD",
            self._url(path, "manifests", ref),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"checking tag {path}:{ref}")
        digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return str(digest)
        return self.get_manifest(path, ref)[2]

    def referrers(self, path: str, digest: str) -> list[dict[str, Any]] | None:
        """Descriptors the OCI 1.1 referrers API lists for ``digest``; None without the API.

        By hand: oras-py has no referrers call. A registry without the API (CNCF distribution
        2.x) answers 404, and clients then use the ``sha256-<hex>`` tag schema instead.
        """
        response = self._request(
            "GET", self._url(path, "referrers", digest), headers={"Accept": OCI_INDEX}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"listing referrers of {path}@{digest}")
        try:
            manifests = response.json().get("manifests") or []
        except (ValueError, AttributeError):
            raise ImageError(
                f"registry {self.host} answered the referrers API with something else than an index"
            ) from None
        return [dict(m) for m in manifests if isinstance(m, dict)]

    def blob_exists(self, path: str, digest: str) -> bool:
        """Whether repository ``path`` has blob ``digest`` (oras-py ``get_blob(head=True)``)."""
        container = oras.container.Container(path, registry=self.host)
        response = self._call(
            lambda: self._oras.get_blob(container, digest, head=True),
            "HEAD",
            f"/v2/{path}/blobs/{digest}",
        )
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._fail(
            response, f"checking blob {digest} in {path}", attempts=self.retry.attempts
        )

    def get_blob_bytes(self, path: str, digest: str) -> bytes:
        """A small blob (configs), verified against its digest."""
        response = self._request("GET", self._url(path, "blobs", digest))
        if response.status_code != 200:
            raise self._fail(response, f"fetching blob {digest} of {path}")
        data = response.content
        if sha256_digest(data) != digest:
            raise ImageError(
                f"registry {self.host} served blob {digest} of {path} with wrong content"
            )
        return data

    def download_blob(
        self,
        path: str,
        digest: str,
        store: BlobStore,
        progress: Progress | None = None,
        size: int = 0,
    ) -> Path:
        """Stream blob ``digest`` of ``path`` into ``store`` (verified, atomic); retried."""
        started = time.monotonic()
        for attempt in range(1, self.retry.attempts + 1):
            response = self._request(
                "GET", self._url(path, "blobs", digest), stream=True, timeout=self._transfer()
            )
            if response.status_code != 200:
                raise self._fail(response, f"fetching blob {digest} of {path}", attempts=attempt)
            done = 0

            def chunks(response: requests.Response = response) -> Iterator[bytes]:
                nonlocal done
                for chunk in response.iter_content(_CHUNK):
                    done += len(chunk)
                    if progress is not None:
                        progress(ProgressEvent(f"download {digest[:19]}", done, size))
                    yield chunk

            try:
                return store.ingest(chunks(), digest)
            # requests' exceptions are OSErrors too: transport failures first.
            except requests.RequestException as exc:
                error = self._stalled(exc, attempt, started, "GET", f"/v2/{path}/blobs/{digest}")
                if error is not None:
                    raise error from None
                time.sleep(self.retry.delay(attempt))
            except OSError as exc:
                raise ImageError(
                    f"cannot store blob {digest} in {store.root}: {exc.strerror}"
                ) from None
            finally:
                response.close()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- write -------------------------------------------------------------------------------

    def mount_blob(self, path: str, digest: str, from_path: str) -> str | None:
        """Ask the registry to mount ``digest`` from repository ``from_path`` into ``path``.

        Written by hand: oras-py has no cross-repository mount. Returns None when mounted
        (201); otherwise the upload session URL the registry opened instead (202).
        """
        query = urlencode({"mount": digest, "from": from_path})
        url = f"{self.base_url}/v2/{path}/blobs/uploads/?{query}"
        response = self._request("POST", url, headers={"Content-Length": "0"})
        if response.status_code == 201:
            return None
        if response.status_code != 202:
            raise self._fail(
                response, f"mounting blob {digest} into {path}", attempts=self.retry.attempts
            )
        return self._location(response)

    def _start_upload(self, path: str) -> str:
        response = self._request(
            "POST", f"{self.base_url}/v2/{path}/blobs/uploads/", headers={"Content-Length": "0"}
        )
        if response.status_code != 202:
            raise self._fail(
                response, f"starting an upload to {path}", attempts=self.retry.attempts
            )
        return self._location(response)

    def _location(self, response: requests.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise ImageError(f"registry {self.host} opened an upload without a Location")
        if location.startswith("/"):
            location = self.base_url + location
        return str(location)

    def upload_blob(
        self,
        path: str,
        digest: str,
        size: int,
        source: Path | bytes,
        *,
        session_url: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Upload one blob monolithically (POST, then one streamed PUT), retried as a whole.

        Written on oras-py's session because its ``put_upload`` reads the whole blob into
        memory and its ``chunked_upload`` gives no progress; model layers are gigabytes.
        """
        policy = self.retry
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            location = session_url or self._start_upload(path)
            session_url = None
            body: Any = (
                source if isinstance(source, bytes) else _FileBody(source, size, digest, progress)
            )
            url = _with_query(location, {"digest": digest})
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            try:
                response = self._oras.do_request(
                    url, "PUT", data=body, headers=headers, timeout=self._transfer()
                )
            except requests.RequestException as exc:
                error = self._stalled(exc, attempt, started, "PUT", f"blob {digest} to {path}")
                if error is not None:
                    raise error from None
            except OSError as exc:
                raise ImageError(f"cannot read blob {digest} to upload: {exc.strerror}") from None
            else:
                if response.status_code == 201:
                    if isinstance(source, bytes) and progress is not None:
                        progress(ProgressEvent(f"upload {digest[:19]}", size, size))
                    return
                retryable = response.status_code in _RETRY_STATUSES or response.status_code == 404
                if not retryable or attempt == policy.attempts:
                    raise self._fail(
                        response, f"uploading blob {digest} to {path}", attempts=attempt
                    )
            time.sleep(policy.delay(attempt))

    def put_manifest(self, path: str, ref: str, data: bytes, media_type: str) -> str:
        """PUT manifest bytes as they are under ``ref`` (digest or tag); return the digest.

        By hand: oras-py's ``upload_manifest`` re-serialises the dict (another digest) and
        validates it against its artifact schema.
        """
        digest = sha256_digest(data)
        response = self._request(
            "PUT",
            self._url(path, "manifests", ref),
            data=data,
            headers={"Content-Type": media_type},
        )
        if response.status_code == 400 and _error_codes(response) & _BLOB_UNKNOWN:
            failure = self._fail(response, f"pushing manifest {path}:{ref}")
            raise BlobUnknownError(failure.message, hint=failure.hint)
        if response.status_code not in (200, 201):
            raise self._fail(
                response, f"pushing manifest {path}:{ref}", attempts=self.retry.attempts
            )
        served = response.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise ImageError(
                f"registry {self.host} stored manifest {path}:{ref} as {served}, expected {digest}"
            )
        return digest


_SHARED: dict[tuple[Any, ...], RegistryClient] = {}
_SHARED_LOCK = threading.Lock()


def shared_client(
    host: str,
    *,
    insecure: bool | None = None,
    retry: RetryPolicy | None = None,
    credentials: tuple[str, str] | None = None,
) -> RegistryClient:
    """A :class:`RegistryClient` kept for this thread and these settings (credentials from
    the environment included), so the builds of one process (a fleet worker builds many)
    share its connections and pay for its ``GET /v2/`` probe once, not once per step."""
    environment = tuple(os.environ.get(k) for k in ("DOCKER_CONFIG", "ORAS_USER", "ORAS_PASS"))
    key = (threading.get_ident(), host, insecure, retry, credentials, environment)
    with _SHARED_LOCK:
        found = _SHARED.get(key)
    if found is None:
        found = RegistryClient(host, insecure=insecure, retry=retry, credentials=credentials)
        with _SHARED_LOCK:
            _SHARED[key] = found
    return found


class _FileBody:
    """A re-iterable streamed request body: each iteration reopens the file from the start.

    requests sends an object with ``__iter__`` and ``__len__`` (and no ``read``) as a
    Content-Length body in 1 MiB chunks, reporting progress as it goes.
    """

    def __init__(self, path: Path, size: int, digest: str, progress: Progress | None) -> None:
        self._path = path
        self._size = size
        self._label = f"upload {digest[:19]}"
        self._progress = progress

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        done = 0
        with self._path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                done += len(chunk)
                if self._progress is not None:
                    self._progress(ProgressEvent(self._label, done, self._size))
                yield chunk


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(dict(params))}" if parts.query else urlencode(dict(params))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _reason(exc: BaseException) -> str:
    """A short reason for a transport failure, free of URLs and headers."""
    text = str(exc).lower()
    if isinstance(exc, requests.Timeout) or "timed out" in text:
        return "timed out"
    for needle, reason in (
        ("connection refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("connection reset", "connection reset"),
        ("remotedisconnected", "connection closed by the registry"),
        ("connection aborted", "connection closed by the registry"),
        ("certificate verify failed", "TLS certificate not trusted"),
        ("wrong version number", "TLS handshake failed (is it plain HTTP? use insecure)"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__


def _errors(response: requests.Response) -> list[dict[str, Any]]:
    """The ``errors`` of a distribution-spec error body ([] when there is none)."""
    try:
        errors = response.json().get("errors") or []
    except (ValueError, AttributeError):
        return []
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _error_codes(response: requests.Response) -> set[str]:
    return {str(e.get("code", "")) for e in _errors(response)}


def _registry_error_detail(response: requests.Response) -> str:
    """``: CODE message`` from a distribution-spec error body, if there is one."""
    parts = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in _errors(response)]
    return f" ({'; '.join(p for p in parts if p)})" if parts else ""
