"""`tilerunner worker` against a real RabbitMQ (Debian rabbitmq-server on loopback).

Workers run as real subprocesses (`python -m tilerunner worker`); jobs are published and
results, dead letters and queue depths read with pika. A job is slowed down for the
SIGTERM/SIGKILL tests with the worker's test-only fault injection (TILERUNNER_FAULT_BATCH_DELAY_S
and small batches), never by sleeping here; "mid-job" is read from the worker's metrics.
Every wait is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tilerunner.config import load_config
from tilerunner.pipeline import RunOptions, run
from tilerunner.worker import FAULT_DELAY_ENV, LOCKS_DIR, MalformedJob, Topology, parse_job
from tilerunner_testlib import App, verbose_config

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:  # testbed/ is a top-level package of the repository
    sys.path.insert(0, str(REPO_ROOT))

from testbed._util import free_port, spawn  # noqa: E402
from testbed.rabbitmq import RabbitMQ, start_rabbitmq  # noqa: E402

pytestmark = pytest.mark.timeout(180)

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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQ]:
    """A private broker for this module (it is restarted by one test, so not the session's)."""
    try:
        broker = start_rabbitmq()
    except Exception as exc:
        pytest.fail(f"test bed: rabbitmq-server could not start: {exc}", pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def wapp(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> App:
    """One app folder (demo models + config) shared by the module's workers."""
    app = App(tmp_path_factory.mktemp("worker") / "app", models_dir)
    app.write(verbose_config(models_dir))
    return app


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, wapp: App, flat_slide: Path) -> Path:
    """A clean `tilerunner run` of the flat slide: <folder>/breast/."""
    out = tmp_path_factory.mktemp("reference")
    run(load_config(wapp.config, wapp.root), flat_slide, out, RunOptions(device="cpu"))
    return out


class WorkerProc:
    """A `python -m tilerunner worker` subprocess with its metrics port and log."""

    def __init__(
        self,
        broker: RabbitMQ,
        app: App,
        queue: str,
        log_dir: Path,
        *args: str,
        delay: float = 0.0,
        url: str | None = None,
    ) -> None:
        self.port = free_port()
        self.log = log_dir / f"worker-{self.port}.log"
        cmd = [sys.executable, "-m", "tilerunner", "worker", "--amqp", url or broker.url]
        cmd += ["--queue", queue, "--app-dir", str(app.root), "--device", "cpu"]
        cmd += ["--metrics-host", "127.0.0.1", "--metrics-port", str(self.port)]
        cmd += ["--retry-delay", "0.2", *args]
        env = {**os.environ, FAULT_DELAY_ENV: str(delay)}
        self.proc = spawn(cmd, self.log, env=env)  # own session; SIGTERMed if pytest dies

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- worker {self.pid} log ---\n" + "\n".join(lines[-25:])

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


@pytest.fixture
def workers(rabbitmq: RabbitMQ, wapp: App, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Start workers; any still running at the end are killed (they are ours, by pid)."""
    started: list[WorkerProc] = []

    def start(
        queue: str, *args: str, delay: float = 0.0, ready: bool = True, url: str | None = None
    ) -> WorkerProc:
        w = WorkerProc(rabbitmq, wapp, queue, tmp_path, *args, delay=delay, url=url)
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in started:
        w.kill()


class Client:
    """The job producer / result consumer side, with pika."""

    def __init__(self, broker: RabbitMQ, queue: str, max_attempts: int = 3) -> None:
        self.topology = Topology(queue, max_attempts)
        self.conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.topology.declare(self.ch)

    def submit(self, job: dict[str, Any] | bytes) -> None:
        body = job if isinstance(job, bytes) else json.dumps(job).encode()
        self.ch.basic_publish(
            "", self.topology.queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )

    def _take(self, queue: str, n: int, what: str, on_fail: Callable[[], str]) -> list[Any]:
        got: list[Any] = []

        def more() -> bool:
            method, props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is not None:
                got.append((props, body))
            return len(got) >= n

        wait_for(more, f"{n} {what}", on_fail=lambda: f"got {got}\n{on_fail()}")
        return got

    def results(self, n: int = 1, on_fail: Callable[[], str] = lambda: "") -> list[dict[str, Any]]:
        taken = self._take(self.topology.results, n, "result message(s)", on_fail)
        return [json.loads(body) for _props, body in taken]

    def dead(self, n: int = 1, on_fail: Callable[[], str] = lambda: "") -> list[tuple[Any, bytes]]:
        return self._take(self.topology.dead, n, "dead letter(s)", on_fail)

    def depth(self, queue: str | None = None) -> int:
        """Ready messages in the job queue (or another)."""
        ok = self.ch.queue_declare(queue or self.topology.queue, passive=True)
        return int(ok.method.message_count)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.conn.is_open:
                self.conn.close()


@pytest.fixture
def client(rabbitmq: RabbitMQ, request: pytest.FixtureRequest) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(queue: str, max_attempts: int = 3) -> Client:
        c = Client(rabbitmq, queue, max_attempts)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def job(job_id: str, slide: Path, output: Path, **extra: Any) -> dict[str, Any]:
    return {"job_version": 1, "job_id": job_id, "slide": str(slide), "output": str(output), **extra}


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
    hidden = [p.name for p in output.iterdir() if p.name.startswith(".") and p.name != LOCKS_DIR]
    assert hidden == [], f"staging folders left behind: {hidden}"


# --------------------------------------------------------------------------- no broker


def test_job_validation_names_the_problem(wapp: App) -> None:
    config = load_config(wapp.config, wapp.root)
    good = job("case-1.a_b", Path("/slides/x.svs"), Path("/out"))
    parsed = parse_job(json.dumps(good).encode(), config)
    assert parsed.analyses == ("breast",) and parsed.folder == Path("/out/case-1.a_b")
    assert parse_job(json.dumps({**good, "analyses": ["breast"]}).encode(), config).analyses

    cases: list[tuple[Any, str, str | None]] = [
        (b"\xff not json", "the body is not JSON", None),
        ([1, 2], "at (top level): [1, 2] is not of type 'object'", None),
        (
            {**good, "job_version": 2},
            "job_version 2 is not supported (this worker reads 1)",
            "case-1.a_b",
        ),
        (
            {k: v for k, v in good.items() if k != "slide"},
            "'slide' is a required property",
            "case-1.a_b",
        ),
        ({**good, "job_id": "../etc"}, "at job_id: '../etc' does not match", None),
        (
            {**good, "slide": "slides/x.svs"},
            "at slide: 'slides/x.svs' does not match",
            "case-1.a_b",
        ),
        (
            {**good, "output": "/out/../app"},
            "output '/out/../app' must not contain '..'",
            "case-1.a_b",
        ),
        (
            {**good, "analyses": ["lung"]},
            "analyses ['lung'] are not in the config analysis.yaml",
            "case-1.a_b",
        ),
        (
            {**good, "priority": 1},
            "Additional properties are not allowed ('priority'",
            "case-1.a_b",
        ),
    ]
    for doc, reason, job_id in cases:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        with pytest.raises(MalformedJob) as info:
            parse_job(body, config)
        assert str(info.value).startswith("malformed job: ")
        assert reason in str(info.value)
        assert "\n" not in str(info.value)
        assert info.value.job_id == job_id


def test_compose_file_parses_and_its_command_is_the_cli() -> None:
    """compose.yaml cannot be run here (no Docker Hub): check its shape and its command."""
    from tilerunner.cli import _parser

    doc = yaml.safe_load((REPO_ROOT / "base-image" / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"rabbitmq", "worker"}
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == "${WORKERS:-2}"
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["environment"]["TILERUNNER_AMQP_URL"].startswith("amqp://")
    args = _parser().parse_args(worker["command"])
    assert args.command == "worker" and args.queue == "tilerunner.jobs"
    assert args.metrics_port == 9464 and "9464" in worker["expose"]
    assert "9464/healthz" in " ".join(worker["healthcheck"]["test"])
    grace_limit = int(worker["stop_grace_period"].rstrip("m")) * 60
    assert args.grace < grace_limit  # the job's grace ends before Docker's SIGKILL
    assert any(v.endswith(":/slides:ro") for v in worker["volumes"])


def test_worker_without_broker_url_or_broker_fails_in_one_line(wapp: App, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TILERUNNER_AMQP_URL"}
    base = [
        sys.executable,
        "-m",
        "tilerunner",
        "worker",
        "--app-dir",
        str(wapp.root),
        "--device",
        "cpu",
        "--metrics-port",
        "0",
    ]
    proc = subprocess.run(base, capture_output=True, text=True, env=env, timeout=WAIT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "tilerunner: error: worker: no broker URL; pass --amqp or set TILERUNNER_AMQP_URL"
    )
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    proc = subprocess.run(
        [*base, "--amqp", url, "--broker-timeout", "1", "--log-format", "text"],
        capture_output=True,
        text=True,
        env=env,
        timeout=WAIT,
        check=False,
    )
    assert proc.returncode == 7, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tilerunner: error: no connection to the broker at amqp://guest:***@")
    assert "s3cret" not in proc.stderr


# --------------------------------------------------------------------------- real broker


def test_worker_the_broker_refuses_exits_with_one_line(
    rabbitmq: RabbitMQ, workers: Callable[..., WorkerProc], client: Callable[..., Client]
) -> None:
    bad = rabbitmq.url.replace("guest:guest@", "guest:wrong-s3cret@")
    w = workers("refused", "--broker-timeout", "600", ready=False, url=bad)
    assert w.wait_exit() == 7  # at once: retrying a refused login does not help
    log = w.log.read_text()
    last = log.strip().splitlines()[-1]
    assert last.startswith("tilerunner: error: the broker at amqp://guest:***@127.0.0.1:")
    assert "refused the login" in last and "ACCESS_REFUSED" in last
    assert "wrong-s3cret" not in log

    client("mismatch", max_attempts=3)
    w = workers("mismatch", "--max-attempts", "5", ready=False)
    assert w.wait_exit() == 7
    last = w.log.read_text().strip().splitlines()[-1]
    assert last.startswith(
        "tilerunner: error: queue mismatch: the broker refused to declare it "
        "(406 PRECONDITION_FAILED"
    )
    assert last.endswith(
        "every worker of a queue needs the same --max-attempts, and the queue "
        "must be a quorum queue"
    )


def test_happy_path_idempotent_results_and_metrics(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    flat_slide: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    c = client("happy")
    w = workers("happy")
    out = tmp_path / "out"
    c.submit(job("case-1", flat_slide, out))
    (first,) = c.results(on_fail=w.tail)
    assert first["status"] == "done", first
    assert first["reason"] is None and first["attempt"] == 1 and first["reused"] is False
    assert first["result_version"] == 1 and first["device"] == "cpu"
    assert first["output"] == str(out / "case-1")
    assert first["outputs"] == {"breast": str(out / "case-1" / "breast")}
    assert first["worker"].endswith(f":{w.pid}")
    summary = json.loads((out / "case-1" / "breast" / "summary.json").read_text())
    assert first["files"]["breast"] == summary["deterministic"]["outputs"]
    carcinoma = summary["deterministic"]["features"]["Carcinoma"]
    assert first["summary"]["breast"]["Carcinoma"]["regions"] == carcinoma["regions"]
    assert first["tiles"] > 0
    assert set(first["durations_s"]) >= {
        "slide_open",
        "tissue",
        "tiles",
        "write",
        "commit",
        "total",
    }
    assert_same_outputs(out / "case-1" / "breast", reference / "breast")
    assert json.loads((out / "case-1" / "job.json").read_text())["result"]["job_id"] == "case-1"
    assert_no_leftovers(out)

    # the same job id again: answered from the complete results, nothing recomputed
    before = (out / "case-1" / "breast" / "carcinoma.geojson").stat().st_mtime_ns
    c.submit(job("case-1", flat_slide, out))
    (again,) = c.results(on_fail=w.tail)
    assert again["status"] == "done" and again["reused"] is True
    assert again["files"] == first["files"] and again["summary"] == first["summary"]
    assert (out / "case-1" / "breast" / "carcinoma.geojson").stat().st_mtime_ns == before

    assert w.metric("tilerunner_jobs_done_total", reused="false") == 1
    assert w.metric("tilerunner_jobs_done_total", reused="true") == 1
    assert w.metric("tilerunner_tiles_total") == first["tiles"]
    assert w.metric("tilerunner_jobs_in_flight") == 0
    assert w.metric("tilerunner_stage_duration_seconds_count", stage="tiles") == 1
    assert w.metric("tilerunner_model_load_seconds") > 0
    assert w.metric("tilerunner_worker_info", device="cpu") == 1
    assert w.metric("tilerunner_broker_connected") == 1
    status, body = w.http("/healthz")
    assert status == 200 and json.loads(body)["connected"] is True
    assert c.depth() == 0

    w.proc.send_signal(signal.SIGTERM)  # idle: stops at once
    assert w.wait_exit() == 0
    assert '"event": "stopped"' in w.log.read_text()


def test_malformed_jobs_are_dead_lettered_and_the_worker_goes_on(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    blank_slide: Path,
    tmp_path: Path,
) -> None:
    c = client("malformed")
    w = workers("malformed")
    out = tmp_path / "out"
    c.submit(b"{not json")
    c.submit(job("m-2", blank_slide, out, analyses=["lung"]))
    c.submit({**job("m-3", blank_slide, out), "job_version": 2})
    c.submit(job("ok-4", blank_slide, out))
    dead = c.dead(3, on_fail=w.tail)
    reasons = [props.headers["x-tilerunner-reason"] for props, _body in dead]
    assert reasons[0].startswith("malformed job: the body is not JSON")
    assert reasons[1].startswith("malformed job: analyses ['lung'] are not in the config")
    assert reasons[2] == "malformed job: job_version 2 is not supported (this worker reads 1)"
    assert dead[0][1] == b"{not json"  # the job as it came
    assert all(props.headers["x-tilerunner-attempts"] == 1 for props, _ in dead)
    results = {r["job_id"]: r for r in c.results(3, on_fail=w.tail)}
    assert results["m-2"]["status"] == "failed" and results["m-2"]["reason"] == reasons[1]
    assert results["m-3"]["status"] == "failed"
    assert results["ok-4"]["status"] == "done" and results["ok-4"]["tiles"] == 0
    assert w.metric("tilerunner_jobs_malformed_total") == 3
    assert w.proc.poll() is None
    assert not (out / "m-2").exists()


def test_poison_job_goes_to_dead_letter_after_max_attempts(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    tmp_path: Path,
) -> None:
    c = client("poison", max_attempts=3)
    w = workers("poison", "--max-attempts", "3")
    poison = tmp_path / "poison.svs"
    poison.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    c.submit(job("p-1", poison, tmp_path / "out"))
    ((props, body),) = c.dead(on_fail=w.tail)
    assert json.loads(body)["job_id"] == "p-1"
    assert props.headers["x-tilerunner-attempts"] == 3
    reason = props.headers["x-tilerunner-reason"]
    assert reason.startswith("failed 3 time(s), last: SlideError: ") and str(poison) in reason
    (result,) = c.results(on_fail=w.tail)
    assert result["status"] == "failed" and result["reason"] == reason
    assert result["attempt"] == 3
    assert w.metric("tilerunner_jobs_failed_total", action="retry") == 2
    assert w.metric("tilerunner_jobs_failed_total", action="dead_letter") == 1
    assert c.depth() == 0 and c.depth(c.topology.results) == 0
    assert_no_leftovers(tmp_path / "out")


def test_a_job_its_workers_die_on_is_dead_lettered_by_the_broker(
    rabbitmq: RabbitMQ, client: Callable[..., Client]
) -> None:
    """The delivery limit counts deliveries whose worker died without any ack (SIGKILL, OOM)."""
    c = client("limit", max_attempts=2)
    c.submit(b'{"job_version": 1}')
    for attempt in range(2):  # a "worker" takes the job and dies (its channel closes)
        ch = c.conn.channel()
        method = wait_for(lambda ch=ch: ch.basic_get("limit")[0], "the job")  # type: ignore[misc]
        assert method.delivery_tag and (attempt == 0 or method.redelivered)
        ch.close()
    ((props, _body),) = c.dead()
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert c.depth() == 0


def test_sigterm_mid_job_finishes_it_within_the_grace_period(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    flat_slide: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    c = client("term")
    w = workers("term", "--batch-size", "4", "--grace", "120", delay=0.3)
    out = tmp_path / "out"
    c.submit(job("t-1", flat_slide, out))
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait_exit() == 0, w.tail()
    (result,) = c.results(on_fail=w.tail)
    assert result["status"] == "done" and result["attempt"] == 1
    assert_same_outputs(out / "t-1" / "breast", reference / "breast")
    assert c.depth() == 0  # acked before the exit: nothing came back to the queue
    log = w.log.read_text()
    assert "stop requested" in log and "job t-1 done" in log
    assert_no_leftovers(out)


def test_sigterm_past_the_grace_period_requeues_the_job_cleanly(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    flat_slide: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    c = client("requeue")
    w = workers("requeue", "--batch-size", "4", "--grace", "0", delay=0.5)
    out = tmp_path / "out"
    c.submit(job("r-1", flat_slide, out))
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait_exit() == 0, w.tail()
    assert "handed back to the queue unfinished" in w.log.read_text()
    wait_for(lambda: c.depth() == 1, "the job back in the queue, ready", on_fail=w.tail)
    assert not (out / "r-1").exists()
    assert_no_leftovers(out)

    w2 = workers("requeue")
    (result,) = c.results(on_fail=w2.tail)
    assert result["status"] == "done" and result["attempt"] == 2
    assert result["worker"].endswith(f":{w2.pid}")
    assert_same_outputs(out / "r-1" / "breast", reference / "breast")


def test_sigkill_mid_job_another_worker_completes_it_identically(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    flat_slide: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    c = client("kill")
    pair = [workers("kill", "--batch-size", "4", delay=0.3, ready=False) for _ in range(2)]
    for w in pair:
        w.wait_ready()
    out = tmp_path / "out"
    c.submit(job("k-1", flat_slide, out))

    def busy() -> WorkerProc | None:
        return next((w for w in pair if w.mid_job()), None)

    victim = wait_for(busy, "a worker to be under way", on_fail=pair[0].tail)
    survivor = pair[1] if victim is pair[0] else pair[0]
    assert any(p.name.startswith(".k-1.partial-") for p in out.iterdir())  # half-written
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=WAIT)

    (result,) = c.results(on_fail=survivor.tail)
    assert result["status"] == "done" and result["attempt"] == 2
    assert result["worker"].endswith(f":{survivor.pid}")
    assert_same_outputs(out / "k-1" / "breast", reference / "breast")
    assert_no_leftovers(out)
    assert c.depth() == 0
    survivor.proc.send_signal(signal.SIGTERM)
    assert survivor.wait_exit() == 0


def test_one_job_id_delivered_twice_at_once_is_computed_once(
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    flat_slide: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    """A producer that published a job twice: the second worker waits, then reuses."""
    c = client("dup")
    pair = [workers("dup", ready=False) for _ in range(2)]
    for w in pair:
        w.wait_ready()
    out = tmp_path / "out"
    c.submit(job("d-1", flat_slide, out))
    c.submit(job("d-1", flat_slide, out))  # prefetch 1: the other worker takes this one
    results = c.results(2, on_fail=lambda: pair[0].tail() + pair[1].tail())
    assert [r["status"] for r in results] == ["done", "done"]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert len({r["worker"] for r in results}) == 2  # one delivery each, at the same time
    assert results[0]["files"] == results[1]["files"]
    assert sum(w.metric("tilerunner_jobs_failed_total", action="retry") for w in pair) == 0
    assert_same_outputs(out / "d-1" / "breast", reference / "breast")
    assert_no_leftovers(out)


def test_worker_reconnects_after_a_broker_restart_while_idle(
    rabbitmq: RabbitMQ,
    workers: Callable[..., WorkerProc],
    client: Callable[..., Client],
    blank_slide: Path,
    tmp_path: Path,
) -> None:
    w = workers("restart")
    rabbitmq.restart()
    wait_for(
        lambda: w.metric("tilerunner_broker_reconnects_total") >= 1,
        "the worker to reconnect",
        on_fail=w.tail,
    )
    w.wait_ready()
    assert "lost the connection to the broker" in w.log.read_text()
    c = client("restart")
    c.submit(job("after-restart", blank_slide, tmp_path / "out"))
    (result,) = c.results(on_fail=w.tail)
    assert result["status"] == "done"
    assert result["worker"].endswith(f":{w.pid}") and w.proc.poll() is None
