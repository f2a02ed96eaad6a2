"""Object stores behind the production weights: s3:// through boto3, file: for air-gapped sites.

The production store is laid out per model: ``<root>/<task id>/<model id>/<file>`` plus the
``publish-manifest.json`` that `builder publish` writes there (model id, task id, sizes and
sha256 of every file). A task can have several output models (clearml-server
``tasks.conf`` ``models.output``), so weights are never keyed by the task alone.

Training-side weights (a model record's ``uri``) are read through ClearML's own storage layer
(:func:`clearml_local_copy`: the SDK's StorageManager/StorageHelper), so ``s3://host:port/...``
(MinIO & co), the ClearML file server, ``gs://`` and ``azure://`` work with the credentials
ClearML users already configure in clearml.conf.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

from builder import yamldoc
from builder.contracts import Progress, ProgressEvent
from builder.cook.registries.clearml import sdk_deadline
from builder.documents.publish_manifest import PublishManifest
from builder.errors import ConfigError, FetchError
from builder.paths import CLEARML_ID, UnsafePathError, check_id, safe_join

MANIFEST_NAME = "publish-manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    """One object of a store: its key below the root and its size in bytes."""

    key: str  # path below the store root, posix
    size: int


class Store(Protocol):
    """What the pipeline needs of a weights store."""

    root: str  # URI of the root, e.g. s3://bucket/prefix or file:/srv/weights

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object below ``prefix``, sorted by key."""
        ...

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, None when there is no such object."""
        ...

    def stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The object's bytes from ``start`` to ``end`` (exclusive), in chunks."""
        ...

    def uri(self, key: str) -> str:
        """The object's URI, as locks and images record it."""
        ...

    def write_stream(
        self, key: str, chunks: Iterator[bytes], size: int, *, progress: Progress | None = None
    ) -> None:
        """Write the object from ``chunks`` (``size`` bytes), reporting progress."""
        ...


class _ChunkReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (for boto3 uploads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # Bounded: a dead endpoint fails in seconds, never hangs a build. Endpoint, region and
    # credentials come from the standard AWS variables/files (AWS_ENDPOINT_URL included).
    config = Config(
        connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", config=config)


class S3Store:
    """A store in an S3 bucket (``s3://bucket[/prefix]``), through boto3."""

    def __init__(self, root: str) -> None:
        parsed = urlparse(root)
        self.root = root.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._client = _s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        """The object's ``s3://bucket/key`` URI."""
        return f"s3://{self.bucket}/{self._key(key)}"

    def _fail(self, action: str, key: str, exc: Exception) -> FetchError:
        return FetchError(f"{action} {self.uri(key)} failed: {_s3_reason(exc)}")

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object below ``prefix`` (all pages of the listing), sorted by key."""
        full = self._key(prefix.rstrip("/") + "/")
        out: list[StoredObject] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for item in page.get("Contents", []):
                    rel = item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
                    out.append(StoredObject(key=rel, size=int(item["Size"])))
        except Exception as exc:
            raise self._fail("listing", prefix, exc) from None
        return sorted(out, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, None when the bucket has no such key."""
        from botocore.exceptions import ClientError

        try:
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=self._key(key))[
                "Body"
            ].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._fail("reading", key, exc) from None
        except Exception as exc:
            raise self._fail("reading", key, exc) from None
        return body

    def stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The object's bytes from ``start`` to ``end`` (exclusive), by one ranged GET."""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}"
            )
            yield from response["Body"].iter_chunks(_CHUNK)
        except Exception as exc:
            raise self._fail("downloading", key, exc) from None

    def write_stream(
        self, key: str, chunks: Iterator[bytes], size: int, *, progress: Progress | None = None
    ) -> None:
        """Upload the object from ``chunks`` (multipart for large ones), reporting progress."""
        done = 0

        def callback(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(ProgressEvent(key, done, size))

        try:
            self._client.upload_fileobj(
                io.BufferedReader(_ChunkReader(chunks), 1 << 20),
                self.bucket,
                self._key(key),
                Callback=callback,
            )
        except FetchError:
            raise
        except Exception as exc:
            raise self._fail("uploading", key, exc) from None


def _s3_reason(exc: Exception) -> str:
    from botocore.exceptions import ClientError, EndpointConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    if isinstance(exc, EndpointConnectionError):
        return f"S3 endpoint unreachable ({exc.kwargs.get('endpoint_url', '?')}); check AWS_ENDPOINT_URL and the network"
    return f"{type(exc).__name__}: {exc}"


class FileStore:
    """A folder store. A relative root (``file:demo/production``) is resolved against ``base``
    but recorded as written, so locks and images do not depend on where the checkout is."""

    def __init__(self, root: str, base: Path) -> None:
        configured = (
            root.removeprefix("file://")
            if root.startswith("file://")
            else root.removeprefix("file:")
        )
        self.configured = configured.rstrip("/")
        self.path = base / self.configured
        self.root = f"file:{self.configured}"

    def uri(self, key: str) -> str:
        """The object's ``file:`` URI, relative as the root was configured."""
        return f"file:{PurePosixPath(self.configured, key)}" if self.configured else f"file:{key}"

    def _at(self, key: str) -> Path:
        """The file for `key`: never outside the store, never through a symlink."""
        try:
            return safe_join(self.path, key, what=f"key in {self.root}") if key else self.path
        except UnsafePathError as exc:
            raise FetchError(str(exc), hint="a store holds plain files only") from None

    def list(self, prefix: str) -> list[StoredObject]:
        """Every file below ``prefix``, sorted by key; FetchError on a symbolic link."""
        base = self._at(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_symlink():
                raise FetchError(
                    f"{self.uri(PurePosixPath(prefix, p.relative_to(base).as_posix()).as_posix())} "
                    "is a symbolic link; a store holds plain files only",
                    hint="replace the link by the file it points to",
                )
            if p.is_file():
                key = PurePosixPath(prefix, p.relative_to(base).as_posix()).as_posix()
                out.append(StoredObject(key=key, size=p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, None when there is no such file."""
        path = self._at(key)
        return path.read_bytes() if path.is_file() else None

    def stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The file's bytes from ``start`` to ``end`` (exclusive); FetchError when it is short."""
        try:
            with self._at(key).open("rb") as handle:
                handle.seek(start)
                remaining = end - start
                while remaining > 0:
                    chunk = handle.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise FetchError(f"{self.uri(key)}: file is shorter than expected")
                    remaining -= len(chunk)
                    yield chunk
        except OSError as exc:
            raise FetchError(f"reading {self.uri(key)} failed: {exc.strerror or exc}") from None

    def write_stream(
        self, key: str, chunks: Iterator[bytes], size: int, *, progress: Progress | None = None
    ) -> None:
        """Write the file from ``chunks`` through a temporary file, so it is never half-written."""
        target = self._at(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        done = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(ProgressEvent(key, done, size))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FetchError(f"writing {self.uri(key)} failed: {exc.strerror or exc}") from None


def open_store(root: str, base: Path | None = None) -> Store:
    """The store for an s3:// or file: root; relative file: roots resolve against ``base``."""
    if root.startswith("s3://"):
        return S3Store(root)
    if root.startswith("file:"):
        return FileStore(root, base or Path.cwd())
    raise FetchError(
        f"unsupported weights store {root!r}", hint="use s3://bucket[/prefix] or file:<folder>"
    )


def file_path(uri: str) -> PurePosixPath:
    """The path of a ``file:`` / ``file://`` URI (relative paths stay relative)."""
    return PurePosixPath(uri.removeprefix("file://") if uri.startswith("file://") else uri[5:])


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/task/f`` -> (``s3://b``, ``p/task/f``); ``file:x/y`` -> (``file:x``, ``y``):
    a file's store is its folder, so the key is a plain name that cannot leave it."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return f"s3://{parsed.netloc}", parsed.path.lstrip("/")
    if uri.startswith("file:"):
        path = file_path(uri)
        return f"file:{path.parent}", path.name
    raise FetchError(f"unsupported weights URI {uri!r}")


def production_folder(task_id: str, model_id: str) -> str:
    """``<task id>/<model id>``: where one model's production weights live, ids checked."""
    task = check_id(task_id, what="task id", pattern=CLEARML_ID, error=FetchError)
    model = check_id(model_id, what="model id", pattern=CLEARML_ID, error=FetchError)
    return f"{task}/{model}"


def read_manifest(store: Store, folder: str) -> PublishManifest | None:
    """The publish manifest of a production folder (``<task id>/<model id>``), if there is one;
    FetchError (one line) when it is not JSON or breaks the schema."""
    raw = store.read_bytes(f"{folder}/{MANIFEST_NAME}")
    if raw is None:
        return None
    uri = store.uri(f"{folder}/{MANIFEST_NAME}")
    try:
        data: dict[str, Any] = json.loads(raw)
        yamldoc.validate_data(data, "publish-manifest", uri)
        return PublishManifest.from_dict(data, uri)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise FetchError(f"{uri}: not valid JSON") from None
    except ConfigError as exc:
        raise FetchError(exc.message, hint="re-run `builder publish` for this model") from None


#: URI schemes ClearML's storage layer reads model weights from (clearml/storage/helper.py:
#: _Boto3Driver "s3", _GoogleCloudStorageDriver "gs", _AzureBlobServiceStorageDriver "azure",
#: _HttpDriver "http"/"https" for the ClearML file server).
CLEARML_SCHEMES = ("s3", "gs", "azure", "http", "https")


def clearml_container(uri: str) -> str:
    """The bucket/container ClearML's StorageHelper resolves for `uri` (its own URI parsing:
    ``s3://host:port/bucket/key`` -> ``s3://host:port/bucket``); FetchError when it cannot."""
    scheme = urlparse(uri).scheme
    if scheme not in CLEARML_SCHEMES:
        raise FetchError(
            f"weights URI {uri!r}: scheme {scheme or '(none)'!r} is not one ClearML stores models on",
            hint=f"supported: {', '.join(s + '://' for s in CLEARML_SCHEMES)} and file:",
        )
    from clearml.storage.helper import StorageError, StorageHelper

    try:
        return str(StorageHelper._resolve_base_url(uri))
    except (StorageError, ValueError) as exc:
        raise FetchError(
            f"weights URI {uri}: {exc}",
            hint="configure the storage in clearml.conf (sdk.aws.s3 / sdk.google.storage / sdk.azure.storage)",
        ) from None


class _SdkErrors(logging.Handler):
    """Keeps the SDK's first and last error lines (StorageManager logs failures and returns
    None, or raises "Storage access failed" after logging why)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first = ""  # the first error: the cause (a missing driver, credentials)
        self.line = ""  # the last one: what finally failed

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip().splitlines()
        if text:
            self.line = text[-1][:300]
            if record.levelno >= logging.ERROR and not self.first:
                self.first = text[-1][:300]


@contextmanager
def _sdk_errors_captured() -> Iterator[_SdkErrors]:
    """Silence the SDK's storage loggers (one clear line is ours to say) and keep its reason."""
    from clearml.debugging.log import LoggerRoot

    LoggerRoot.get_base_logger()  # its handlers are added on first use: before ours, not after
    capture = _SdkErrors()
    loggers = [
        logging.getLogger(n) for n in ("clearml", "clearml.storage", "clearml.storage_manager")
    ]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [capture]
        lg.propagate = False
    try:
        yield capture
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate


#: Seconds one weights download through the ClearML SDK may take, retries included.
STORAGE_DEADLINE_SECONDS = 1800
#: Retries of one HTTP request to a file server, and the seconds a connection may take to open
#: and may stay silent. The SDK's own (clearml 2.1.12 storage/helper.py::_HttpDriver:
#: ``sdk.http.download.max_retries`` 15, backoff up to 120 s, 503 retried) keep a download of
#: a failing file server going for half an hour; a lower ``sdk.http.timeout`` is kept.
HTTP_RETRIES = 2
HTTP_CONNECT_TIMEOUT = 10
HTTP_READ_TIMEOUT = 30


def _bound_sdk_storage(uri: str) -> None:
    """Cap the SDK's storage retries and timeouts for ``uri``'s store before it is used."""
    from clearml.storage.helper import StorageHelper, _HttpDriver

    # LazyEvalWrapper class attributes of the SDK's configuration; plain ints replace them
    connect = min(int(_HttpDriver.timeout_connection), HTTP_CONNECT_TIMEOUT)
    read = min(int(_HttpDriver.timeout_total), HTTP_READ_TIMEOUT)
    _HttpDriver.timeout_connection, _HttpDriver.timeout_total = connect, read  # type: ignore[assignment]
    # One helper per store (base URL), created here with few retries, is the one the
    # StorageManager then reuses (StorageHelper.get caches it).
    StorageHelper.get(uri, retries=HTTP_RETRIES)  # type: ignore[no-untyped-call]


def _unreachable(line: str, uri: str) -> str | None:
    """Why the store of ``uri`` could not be reached, from the SDK's last error line, naming
    the host; None when the line says something else (a missing object, credentials)."""
    from clearml.storage.helper import _HttpDriver

    host = urlparse(uri).netloc or uri
    if match := re.search(r"too many (\d+) error responses", line):
        return f"{host} kept answering HTTP {match[1]} ({HTTP_RETRIES} retries)"
    if re.search(r"Read timed out|ReadTimeout", line):
        return f"{host} did not answer within {int(_HttpDriver.timeout_total)} s ({HTTP_RETRIES} retries)"
    if re.search(r"Connection refused|NewConnectionError|Failed to establish", line):
        return f"{host} refused the connection"
    return None


def clearml_local_copy(uri: str) -> Path:
    """Download one weights object through ClearML's StorageManager, with the credentials of
    clearml.conf (``sdk.aws.s3.credentials`` for host:port endpoints, the API session for the
    file server, gs/azure sections); the file lands in ClearML's cache (CLEARML_CACHE_DIR)."""
    clearml_container(uri)
    from clearml import StorageManager

    with _sdk_errors_captured() as sdk:
        try:
            with sdk_deadline(STORAGE_DEADLINE_SECONDS, f"download of {uri}", FetchError):
                _bound_sdk_storage(uri)
                local = StorageManager.get_local_copy(
                    uri, extract_archive=False, force_download=True
                )
        except FetchError:
            raise
        except Exception as exc:  # the SDK's logged reason first: it may say what to install
            reason = sdk.first or f"{type(exc).__name__}: {exc}"
            raise FetchError(f"downloading {uri} through ClearML failed: {reason}") from None
    if not local or not Path(local).is_file():
        if unreachable := _unreachable(sdk.line, uri):
            raise FetchError(
                f"the model's weights {uri} cannot be downloaded: {unreachable}",
                hint="check that the server is up, then publish again",
            )
        reason = f" ({sdk.line})" if sdk.line else ""
        raise FetchError(
            f"the model's weights {uri} do not exist or cannot be read with ClearML's storage settings{reason}",
            hint="check the URI and the credentials in clearml.conf (sdk.aws.s3.credentials, files server)",
        )
    return Path(local)
