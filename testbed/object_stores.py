"""Google Cloud Storage and Azure Blob Storage on loopback, for ClearML's ``gs://`` and
``azure://`` weights (the SDK's own drivers, clearml 2.1.12 storage/helper.py
``_GoogleCloudStorageDriver`` and ``_AzureBlobServiceStorageDriver``, talk to them unchanged).

* GCS: ``gcp-storage-emulator`` (PyPI), in process. The google-cloud-storage client the SDK
  builds goes to it when ``STORAGE_EMULATOR_HOST`` is set (the client's documented switch).
* Azure: Azurite (npm, Microsoft's emulator), installed into the test-bed cache on first use.
  The SDK always addresses ``https://<account>.blob.core.windows.net`` (helper.py builds the
  account URL from the ``azure://`` URI's host, scheme fixed to https), so Azurite serves TLS
  with a certificate of a throw-away CA for ``*.blob.core.windows.net``, and a small CONNECT
  proxy (``HTTPS_PROXY``, which the Azure SDK's requests transport honours) stands in for DNS:
  it tunnels ``<account>.blob.core.windows.net:443`` to Azurite, which takes the account from
  the host name (its "production-style URL"). Bytes, TLS, auth and blob protocol are Azurite's.

    with start_gcs() as gcs:     gcs.put("bucket", "key", b"..."); env.update(gcs.env())
    with start_azurite() as az:  az.put("container", "key", b"..."); env.update(az.env())
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from testbed._util import (
    Service,
    ServiceError,
    cache_root,
    free_port,
    spawn,
    stop_process,
    tail,
    wait_until,
)

#: The newest Azurite whose package.json admits this machine's Node 20 (3.36 needs Node 21).
AZURITE_VERSION = "3.35.0"
AZURE_ACCOUNT = "ivdtestbed"
#: Azurite accepts any base64 key for an account given in AZURITE_ACCOUNTS.
AZURE_KEY = "aXZkLXRlc3QtYmVkLWF6dXJlLWFjY291bnQta2V5LTEyMzQ1Njc4OTA="
AZURE_SUFFIX = ".blob.core.windows.net"


@dataclass
class GcsServer(Service):
    """gcp-storage-emulator in this process."""

    endpoint: str
    _server: Any = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """What makes google-cloud-storage (and so the clearml SDK) use this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Upload an object (the bucket is created when missing)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="ivd-testbed",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.endpoint},
        )
        target = client.bucket(bucket)
        if not target.exists():
            client.create_bucket(bucket)
        target.blob(key).upload_from_string(data)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def start_gcs() -> GcsServer:
    """gcp-storage-emulator on an ephemeral 127.0.0.1 port, in memory."""
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    port = server._api._httpd.server_address[1]
    return GcsServer(endpoint=f"http://127.0.0.1:{port}", _server=server)


# --- Azure --------------------------------------------------------------------------------


def _azurite_binary() -> Path:
    """azurite-blob, installed from npm into the test-bed cache when missing."""
    prefix = cache_root() / f"azurite-{AZURITE_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    with FileLock(str(cache_root() / "azurite.lock"), timeout=900):
        if binary.exists():
            return binary
        npm = shutil.which("npm")
        if npm is None:
            raise ServiceError("npm is missing: install nodejs and npm (Debian packages)")
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
             f"azurite@{AZURITE_VERSION}"],
            capture_output=True, text=True, check=False, timeout=900,
        )  # fmt: skip
        if installed.returncode != 0 or not binary.exists():
            raise ServiceError(f"npm install azurite failed: {installed.stderr[-2000:]}")
    return binary


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate it signed for ``*.blob.core.windows.net``:
    (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("ivd test bed CA"))
        .issuer_name(name("ivd test bed CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    hosts = [f"*{AZURE_SUFFIX}", f"{AZURE_ACCOUNT}{AZURE_SUFFIX}"]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[1]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _TunnelProxy:
    """An HTTP CONNECT proxy that tunnels ``*.blob.core.windows.net:443`` to one local port
    (and refuses anything else); ``hosts`` records what was asked for."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hosts: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(1024)
                if not chunk:
                    return
                head += chunk
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            host = target.rsplit(":", 1)[0]
            if method != "CONNECT" or not host.endswith(AZURE_SUFFIX):
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            self.hosts.append(host)
            with contextlib.closing(
                socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            ) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._pipe(client, upstream)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stopping.is_set():
            ready, _, _ = select.select(list(peers), [], [], 0.5)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()


@dataclass
class AzuriteServer(Service):
    """Azurite's blob service behind TLS and the CONNECT proxy that reaches it."""

    port: int
    ca: Path
    proxy: _TunnelProxy
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    account = AZURE_ACCOUNT
    key = AZURE_KEY

    @property
    def host(self) -> str:
        """The account's host name, as in ``azure://<host>/<container>/<blob>``."""
        return f"{self.account}{AZURE_SUFFIX}"

    def env(self) -> dict[str, str]:
        """What routes the Azure SDK (requests) to Azurite and makes it trust the test CA."""
        return {
            "HTTPS_PROXY": self.proxy.url,
            "https_proxy": self.proxy.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "REQUESTS_CA_BUNDLE": str(self.ca),
        }

    def clearml_conf(self) -> str:
        """The clearml.conf lines a ClearML user writes for this storage account."""
        return (
            f'sdk.azure.storage.containers: [{{account_name: "{self.account}", '
            f'account_key: "{self.key}"}}]\n'
        )

    def put(self, container: str, blob: str, data: bytes) -> None:
        """Upload a blob (the container is created when missing)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(
            account_url=f"https://{self.host}",
            credential={"account_name": self.account, "account_key": self.key},
            proxies={"https": self.proxy.url},
            connection_verify=str(self.ca),
        )
        with contextlib.suppress(ResourceExistsError):
            service.create_container(container)
        service.get_blob_client(container, blob).upload_blob(data, overwrite=True)

    def stop(self) -> None:
        self.proxy.stop()
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None


def start_azurite(workdir: Path, timeout: float = 60.0) -> AzuriteServer:
    """Azurite's blob service (TLS, in memory) on an ephemeral port, plus its proxy."""
    binary = _azurite_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = _tls_files(workdir)
    port = free_port()
    log = workdir / "azurite.log"
    proc = spawn(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--cert", str(cert),
         "--key", str(key), "--inMemoryPersistence", "--skipApiVersionCheck", "--loose",
         "--disableTelemetry"],
        log,
        cwd=workdir,
        env={**os.environ, "AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{AZURE_KEY}"},
    )  # fmt: skip

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_until(listening, timeout=timeout, what="Azurite", proc=proc, log=log)
    except ServiceError:
        stop_process(proc)
        raise
    server = AzuriteServer(port=port, ca=ca, proxy=_TunnelProxy(port), _proc=proc)
    if proc.poll() is not None:
        server.stop()
        raise ServiceError(f"Azurite exited:\n{tail(log)}")
    return server
