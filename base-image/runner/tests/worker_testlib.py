"""Helpers of the worker tests: worker subprocesses, a pika client, one job queue's site.

Workers run as real subprocesses (`python -m tilerunner worker`) against a real RabbitMQ;
jobs are published and results, dead letters and queue depths read with pika. Every wait is
bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tilerunner.worker.serve import FAULT_DELAY_ENV, FAULT_HOLD_ENV
from tilerunner.worker.store import JOBS_DIR, LOCKS_DIR
from tilerunner.worker.topology import DEFAULT_DELIVERY_LIMIT, Topology
from tilerunner_testlib import App, cache_root

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:  # testbed/ is a top-level package of the repository
    sys.path.insert(0, str(REPO_ROOT))

from testbed._util import free_port, spawn  # noqa: E402
from testbed.rabbitmq import RabbitMQ, start_rabbitmq  # noqa: E402

__all__ = [
    "WAIT",
    "Client",
    "RabbitMQ",
    "Site",
    "WorkerProc",
    "assert_no_leftovers",
    "assert_same_outputs",
    "free_port",
    "in_tmpfs",
    "job",
    "start_broker",
    "tilerunner",
    "wait_for",
]

WAIT = 90.0  # upper bound of any single wait


def wait_for(
    check: Callable[[], Any],
    what: str,
    timeout: float = WAIT,
    on_fail: Callable[[], str] = lambda: "",
) -> Any:
    """Poll until `check()` is truthy; fail with `what` (and `on_fail()`) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{on_fail()}")
        time.sleep(0.1)


def in_tmpfs(folder: Path, size: str) -> list[str]:
    """A command prefix: run the command with a `size` tmpfs mounted on `folder`.

    A private mount namespace (unshare), so the mount is the command's alone and goes away
    with it: a real, small, full-able file system without touching the host's mounts.
    """
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is needed for the full-disk tests"
    namespace = [unshare, *user, "--mount", "--propagation", "private", "--"]
    return [*namespace, "sh", "-c", script, "sh", size, str(folder)]


def tilerunner(
    *args: str, env: dict[str, str] | None = None, wrap: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m tilerunner ARGS` (behind the `wrap` prefix) to completion, bounded."""
    return subprocess.run(
        [*wrap, sys.executable, "-m", "tilerunner", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=WAIT,
        check=False,
    )


def job(job_id: str, slide: Path, output: Path, **extra: Any) -> dict[str, Any]:
    return {"job_version": 1, "job_id": job_id, "slide": str(slide), "output": str(output), **extra}


class WorkerProc:
    """A `python -m tilerunner worker` subprocess with its metrics port and log."""

    def __init__(
        self,
        url: str,
        app: App,
        queue: str,
        log_dir: Path,
        args: Sequence[str],
        delay: float = 0.0,
        wrap: Sequence[str] = (),
        hold: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.log = log_dir / f"worker-{self.port}.log"
        cmd = [*wrap, sys.executable, "-m", "tilerunner", "worker", "--amqp", url]
        cmd += ["--queue", queue, "--app-dir", str(app.root), "--device", "cpu"]
        cmd += ["--metrics-host", "127.0.0.1", "--metrics-port", str(self.port)]
        cmd += ["--retry-delay", "0.2", *args]
        env = {**os.environ, FAULT_DELAY_ENV: str(delay), FAULT_HOLD_ENV: str(hold or "")}
        self.proc = spawn(cmd, self.log, env=env)  # own session; SIGTERMed if pytest dies

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records of one event."""
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
        return out

    def tail(self) -> str:
        lines = self.text().splitlines()
        return f"--- worker {self.pid} log ---\n" + "\n".join(line[:2000] for line in lines[-25:])

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0.0 when absent)."""
        _status, text = self.http("/metrics")
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}\n{self.tail()}")
            return self.http("/readyz")[0] == 200

        wait_for(ready, "the worker to be ready", on_fail=self.tail)

    def mid_job(self) -> bool:
        return (
            self.metric("tilerunner_jobs_in_flight") == 1
            and self.metric("tilerunner_tiles_total") > 0
        )

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.pid} did not exit within {timeout:.0f} s\n{self.tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Client:
    """The job producer / result consumer side, with pika; reconnects after a broker restart."""

    def __init__(self, url: str, queue: str, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> None:
        self.url = url
        self.topology = Topology(queue, delivery_limit)
        self._connect()

    def _connect(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.topology.declare(self.ch)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """fn(), once more on a fresh connection if the broker dropped the old one."""
        try:
            return fn()
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError):
            self.close()
            wait_for(self._reconnected, "the broker to take a connection again")
            return fn()

    def _reconnected(self) -> bool:
        try:
            self._connect()
        except pika.exceptions.AMQPConnectionError:
            return False
        return True

    def submit(self, job: dict[str, Any] | bytes) -> None:
        body = job if isinstance(job, bytes) else json.dumps(job).encode()
        props = pika.BasicProperties(delivery_mode=2)
        self._call(
            lambda: self.ch.basic_publish("", self.topology.queue, body, props, mandatory=True)
        )

    def _take(self, queue: str, n: int, what: str, on_fail: Callable[[], str]) -> list[Any]:
        got: list[Any] = []

        def more() -> bool:
            method, props, body = self._call(lambda: self.ch.basic_get(queue, auto_ack=True))
            if method is not None:
                got.append((props, body))
            return len(got) >= n

        wait_for(more, f"{n} {what}", on_fail=lambda: f"got {str(got)[:3000]}\n{on_fail()}")
        return got

    def results(self, n: int = 1, on_fail: Callable[[], str] = lambda: "") -> list[dict[str, Any]]:
        taken = self._take(self.topology.results, n, "result message(s)", on_fail)
        return [json.loads(body) for _props, body in taken]

    def dead(self, n: int = 1, on_fail: Callable[[], str] = lambda: "") -> list[tuple[Any, bytes]]:
        return self._take(self.topology.dead, n, "dead letter(s)", on_fail)

    def depth(self, queue: str | None = None) -> int:
        """Ready messages in the job queue (or another)."""
        name = queue or self.topology.queue
        ok = self._call(lambda: self.ch.queue_declare(name, passive=True))
        return int(ok.method.message_count)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.conn.is_open:
                self.conn.close()


class Site:
    """One job queue as a site runs it: allowed folders, a client, and workers on them.

    Slides may come from the test slide cache and `root/slides`; outputs go under
    `root/out` (the output root, where `out` is also the jobs' default output).
    """

    def __init__(
        self,
        broker: RabbitMQ,
        app: App,
        queue: str,
        root: Path,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    ) -> None:
        self.broker, self.app, self.queue, self.root = broker, app, queue, root
        self.slides = root / "slides"
        self.out = root / "out"
        self.slide_roots = [cache_root(), self.slides]
        for folder in (self.slides, self.out):
            folder.mkdir(parents=True, exist_ok=True)
        self.client = Client(broker.url, queue, delivery_limit)
        self.started: list[WorkerProc] = []

    def roots(self) -> list[str]:
        """The worker options that allow this site's folders."""
        slides = [arg for root in self.slide_roots for arg in ("--slide-root", str(root))]
        return [*slides, "--output-root", str(self.out)]

    def worker(
        self,
        *args: str,
        delay: float = 0.0,
        ready: bool = True,
        url: str | None = None,
        wrap: Sequence[str] = (),
        hold: Path | None = None,
    ) -> WorkerProc:
        """Start a worker on this queue (killed, by pid, at the end of the test); `delay`
        and `hold` are its test-only fault injection (tilerunner/worker/serve.py)."""
        w = WorkerProc(
            url or self.broker.url,
            self.app,
            self.queue,
            self.root,
            [*self.roots(), *args],
            delay=delay,
            wrap=wrap,
            hold=hold,
        )
        self.started.append(w)
        if ready:
            w.wait_ready()
        return w

    def workers(self, n: int, *args: str, **kwargs: Any) -> list[WorkerProc]:
        """`n` workers started together, all ready."""
        started = [self.worker(*args, ready=False, **kwargs) for _ in range(n)]
        for w in started:
            w.wait_ready()
        return started

    def submit(self, job_id: str, slide: Path, output: Path | None = None, **extra: Any) -> None:
        self.client.submit(job(job_id, slide, output or self.out, **extra))

    def tails(self) -> str:
        return "\n".join(w.tail() for w in self.started)

    def close(self) -> None:
        for w in self.started:
            w.kill()
        self.client.close()


def assert_same_outputs(got: Path, want: Path) -> None:
    """Byte-identical files, and the same deterministic section of summary.json."""
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in want.iterdir())
    for name in names:
        if name == "summary.json":
            a, b = (json.loads((d / name).read_text()) for d in (got, want))
            assert a["deterministic"] == b["deterministic"]
        else:
            assert (got / name).read_bytes() == (want / name).read_bytes(), name


def assert_no_leftovers(output: Path) -> None:
    """No staging folders, and no lock file of a finished job."""
    ours = (LOCKS_DIR, JOBS_DIR)
    hidden = [p.name for p in output.iterdir() if p.name.startswith(".") and p.name not in ours]
    assert hidden == [], f"staging folders left behind: {hidden}"
    locks = output / LOCKS_DIR
    left = sorted(p.name for p in locks.iterdir()) if locks.is_dir() else []
    assert left == [], f"lock files left behind: {left}"


@contextlib.contextmanager
def start_broker() -> Iterator[RabbitMQ]:
    """A private rabbitmq-server for the block; a start failure fails the test in one line."""
    try:
        broker = start_rabbitmq()
    except Exception as exc:
        pytest.fail(f"test bed: rabbitmq-server could not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()
