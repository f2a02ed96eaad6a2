"""`tilerunner worker`'s entry point: check the folders, load the models once, serve.

The models are loaded before the first connection, so a bad config or model fails at start
(the CLI's exit codes) instead of on the first job; metrics and health are served on their
own port while the worker consumes jobs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from tilerunner import __version__
from tilerunner.config import RunConfig
from tilerunner.errors import RunnerError
from tilerunner.models import EngineOptions, ModelStore
from tilerunner.pipeline import RunOptions
from tilerunner.worker.consumer import Worker, WorkerSettings
from tilerunner.worker.jobrunner import Faults, JobRunner
from tilerunner.worker.metrics import HttpServer, Metrics
from tilerunner.worker.store import Roots

log = logging.getLogger("tilerunner.worker")

#: Test-only fault injection: seconds the worker waits after each batch of tiles.
FAULT_DELAY_ENV = "TILERUNNER_FAULT_BATCH_DELAY_S"
#: Test-only fault injection: a file; while it exists, the job waits after each batch.
FAULT_HOLD_ENV = "TILERUNNER_FAULT_HOLD_FILE"


def faults_from_env() -> Faults:
    """The test-only fault injection asked for in the environment (none in production)."""
    raw = os.environ.get(FAULT_DELAY_ENV, "").strip() or "0"
    try:
        delay = float(raw)
    except ValueError:
        raise RunnerError(f"{FAULT_DELAY_ENV}={raw!r} is not a number of seconds") from None
    if not delay >= 0:
        raise RunnerError(f"{FAULT_DELAY_ENV} must be >= 0")
    hold = os.environ.get(FAULT_HOLD_ENV, "").strip()
    return Faults(delay, Path(hold) if hold else None)


def _check_roots(roots: Roots) -> None:
    for warning in roots.check():
        log.warning("%s", warning, extra={"event": "output_root_in_memory"})
    log.info(
        "jobs may read slides from %s and write results under %s",
        ", ".join(str(r) for r in roots.slides),
        roots.output,
        extra={"event": "roots"},
    )


def _load_models(config: RunConfig, options: RunOptions, metrics: Metrics) -> ModelStore:
    t = time.perf_counter()
    store = ModelStore(EngineOptions(options.device, options.threads, options.spin))
    store.load(config)
    load_s = time.perf_counter() - t
    metrics.model_load_s.set(load_s)
    metrics.info.info(
        {
            "version": __version__,
            "device": store.device,
            "providers": ",".join(store.providers),
            "customer": config.customer,
            "config_sha256": config.sha256,
        }
    )
    log.info(
        "models loaded in %.1f s on %s (config %s, sha256 %s)",
        load_s,
        store.device,
        config.path,
        config.sha256[:12],
        extra={"event": "models_loaded"},
    )
    return store


def _start_http(settings: WorkerSettings, metrics: Metrics) -> HttpServer | None:
    if not settings.metrics_port:
        return None
    http = HttpServer(metrics, settings.metrics_host, settings.metrics_port)
    http.start()
    log.info(
        "metrics and health on http://%s:%d/metrics, /healthz, /readyz",
        settings.metrics_host,
        http.port,
        extra={"event": "http"},
    )
    return http


def _prune(runner: JobRunner) -> None:
    locks, records = runner.jobs.prune()
    if locks or records:
        log.info(
            "removed %d stale lock file(s) and %d record(s) of deleted results from %s",
            locks,
            records,
            runner.jobs.roots.output,
            extra={"event": "pruned"},
        )


def serve(settings: WorkerSettings, config: RunConfig, options: RunOptions) -> int:
    """Load the models once, serve metrics, consume jobs until SIGTERM/SIGINT; exit code."""
    faults = faults_from_env()
    roots = settings.roots
    _check_roots(roots)
    metrics = Metrics()
    store = _load_models(config, options, metrics)
    if faults:
        log.warning(
            "TEST-ONLY fault injection: waiting %g s after each batch (%s), and while %s "
            "exists (%s)",
            faults.delay_s,
            FAULT_DELAY_ENV,
            faults.hold,
            FAULT_HOLD_ENV,
            extra={"event": "fault_injection"},
        )
    http = _start_http(settings, metrics)
    runner = JobRunner(config, store, options, metrics, faults, roots)
    _prune(runner)
    worker = Worker(settings, runner, metrics)
    previous = {
        sig: signal.signal(sig, worker.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return worker.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if http is not None:
            http.stop()
