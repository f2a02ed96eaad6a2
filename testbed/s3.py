"""An S3 endpoint on loopback: moto in server mode, talked to over HTTP by boto3 and the SDKs."""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from moto.server import ThreadedMotoServer

from testbed._util import Service, ServiceError, wait_until

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


@dataclass
class S3Server(Service):
    """A running moto server; create buckets with create_bucket(), point clients at env()."""

    endpoint_url: str
    _server: ThreadedMotoServer | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """AWS_* variables that make boto3 (and the clearml SDK) use this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def create_bucket(self, *names: str) -> None:
        """Create buckets (existing ones are kept)."""
        s3 = self.client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for name in names:
            if name not in existing:
                s3.create_bucket(Bucket=name)

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        """Stop the server thread."""
        if self._server is not None:
            self._server.stop()
            self._server = None


def start_s3(timeout: float = 30.0) -> S3Server:
    """Start moto on an ephemeral 127.0.0.1 port and wait until it answers."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint_url=f"http://{host}:{port}", _server=server)

    def answers() -> bool:
        with urllib.request.urlopen(f"{s3.endpoint_url}/moto-api/", timeout=2) as resp:
            return int(resp.status) == 200

    try:
        wait_until(answers, timeout=timeout, what="moto S3 server")
    except ServiceError:
        s3.stop()
        raise
    return s3
