"""Prometheus metrics and health endpoints of `tilerunner worker` (prometheus-client).

One HTTP port serves:

    /metrics   Prometheus text format (the metrics below + process_* and python_* ones)
    /healthz   liveness: 200 while the worker's main loop turns (JSON status), else 503
    /readyz    readiness: 200 while connected to the broker and taking jobs, else 503
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from tilerunner.errors import RunnerError

#: Seconds without a turn of the main loop after which /healthz says the worker is stuck.
LIVENESS_S = 60.0
STAGES = ("slide_open", "tissue", "tiles", "write", "commit", "total")
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The worker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        p = "tilerunner"
        self.jobs_done = Counter(
            f"{p}_jobs_done",
            "Jobs completed (reused: results already complete for the job id)",
            ["reused"],
            registry=r,
        )
        self.jobs_failed = Counter(
            f"{p}_jobs_failed",
            "Failed job attempts, by what happened next (retry or dead_letter)",
            ["action"],
            registry=r,
        )
        self.jobs_malformed = Counter(
            f"{p}_jobs_malformed", "Malformed jobs (dead-lettered at once)", registry=r
        )
        self.jobs_requeued = Counter(
            f"{p}_jobs_requeued",
            "Jobs handed back to the broker unfinished on shutdown",
            registry=r,
        )
        self.jobs_in_flight = Gauge(f"{p}_jobs_in_flight", "Jobs being processed", registry=r)
        self.tiles = Counter(f"{p}_tiles", "Tiles analysed (all passes)", registry=r)
        self.tiles_per_s = Gauge(
            f"{p}_tiles_per_second", "Tile rate of the current or last job", registry=r
        )
        self.stage_s = Histogram(
            f"{p}_stage_duration_seconds",
            "Duration of the stages of completed jobs",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.model_load_s = Gauge(
            f"{p}_model_load_seconds", "Time to load all models at start", registry=r
        )
        self.connected = Gauge(
            f"{p}_broker_connected", "1 while connected to the broker", registry=r
        )
        self.reconnects = Counter(
            f"{p}_broker_reconnects", "Connections to the broker after the first", registry=r
        )
        self.info = Info(f"{p}_worker", "Runner version, device and providers", registry=r)
        self.last_loop = time.monotonic()
        self.status: dict[str, Any] = {
            "connected": False,
            "consuming": False,
            "stopping": False,
            "job_id": None,
        }

    def tick(self, **status: Any) -> None:
        """The main loop turned; update the status /healthz shows."""
        self.last_loop = time.monotonic()
        self.status.update(status)


def _json(start: Callable[..., Any], code: str, doc: dict[str, Any]) -> Iterable[bytes]:
    start(code, [("Content-Type", "application/json")])
    return [json.dumps(doc, sort_keys=True).encode() + b"\n"]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class HttpServer:
    """/metrics, /healthz and /readyz on a port of their own, served from a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self._prom = make_wsgi_app(metrics.registry)
        try:
            self._httpd = make_server(host, port, self._app, _Server, _QuietHandler)
        except OSError as exc:
            raise RunnerError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
                "choose another --metrics-port"
            ) from None
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def _app(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/metrics", "/"):
            return self._prom(environ, start)  # type: ignore[no-any-return]
        status = dict(self.metrics.status)
        age = time.monotonic() - self.metrics.last_loop
        status["loop_age_s"] = round(age, 3)
        if path == "/healthz":
            ok = age < LIVENESS_S
        elif path == "/readyz":
            ok = bool(status["connected"] and status["consuming"] and not status["stopping"])
        else:
            return _json(start, "404 Not Found", {"error": f"no such path {path}"})
        return _json(start, "200 OK" if ok else "503 Service Unavailable", status)
