"""`tilerunner worker` against a real RabbitMQ (Debian rabbitmq-server on loopback).

Workers run as real subprocesses (`python -m tilerunner worker`, see worker_testlib.py); jobs
are published and results, dead letters and queue depths read with pika. A job is slowed down
for the SIGTERM/SIGKILL tests with the worker's test-only fault injection
(TILERUNNER_FAULT_BATCH_DELAY_S and small batches), never by sleeping here; "mid-job" is read
from the worker's metrics. Every wait is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tilerunner.config import load_config
from tilerunner.worker.jobs import MalformedJob, parse_job
from tilerunner_testlib import TILE_LENGTH, TILE_WIDTH, App, crafted_tiff
from worker_testlib import (
    REPO_ROOT,
    WAIT,
    RabbitMQ,
    Site,
    assert_no_leftovers,
    assert_same_outputs,
    free_port,
    job,
    tilerunner,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

# --------------------------------------------------------------------------- no broker


def test_job_validation_names_the_problem(wapp: App) -> None:
    config = load_config(wapp.config, wapp.root)
    good = job("case-1.a_b", Path("/slides/x.svs"), Path("/out"))
    parsed = parse_job(json.dumps(good).encode(), config)
    assert parsed.analyses == ("breast",) and parsed.folder == Path("/out/case-1.a_b")
    assert parse_job(json.dumps({**good, "analyses": ["breast"]}).encode(), config).analyses

    huge = "x" * 2_000_000
    cases: list[tuple[Any, str, str | None]] = [
        (b"\xff not json", "the body is not JSON", None),
        ([1, 2], "at (top level): [1, 2] is not of type 'object'", None),
        ({**good, "job_version": 2}, "job_version 2 is not supported (this worker reads 1)", "case-1.a_b"),
        ({k: v for k, v in good.items() if k != "slide"}, "'slide' is a required property", "case-1.a_b"),
        ({**good, "job_id": "../etc"}, "at job_id: '../etc' does not match", None),
        ({**good, "slide": "slides/x.svs"}, "at slide: 'slides/x.svs' does not match", "case-1.a_b"),
        ({**good, "output": "/out/../app"}, "output '/out/../app' must not contain '..'", "case-1.a_b"),
        ({**good, "analyses": ["lung"]}, "analyses ['lung'] are not in the config analysis.yaml", "case-1.a_b"),
        ({**good, "priority": 1}, "Additional properties are not allowed ('priority'", "case-1.a_b"),
        # fields of any size give a reason of bounded size
        ({**good, "job_version": huge}, "job_version 'xxx", "case-1.a_b"),
        ({**good, "slide": "/" + huge}, "at slide: '/xxx", "case-1.a_b"),
        ({**good, "output": f"/{huge}/../x"}, "at output: '/xxx", "case-1.a_b"),
        ({**good, "analyses": [huge]}, "at analyses.0: 'xxx", "case-1.a_b"),
    ]  # fmt: skip
    for doc, reason, job_id in cases:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        with pytest.raises(MalformedJob) as info:
            parse_job(body, config)
        assert str(info.value).startswith("malformed job: ")
        assert reason in str(info.value)
        assert "\n" not in str(info.value) and len(str(info.value)) < 1200
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
    # the allowed folders are the mounted volumes: slides read-only, results on a volume
    mounts = {v.removesuffix(":ro").rsplit(":", 1)[1]: v for v in worker["volumes"]}
    assert [str(p) for p in args.slide_roots] == ["/slides"]
    assert mounts["/slides"].endswith(":/slides:ro")
    assert str(args.output_root) == "/out" and not mounts["/out"].endswith(":ro")
    assert all(not t.startswith("/out") for t in worker.get("tmpfs", []))


def test_worker_without_broker_url_or_broker_fails_in_one_line(wapp: App, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TILERUNNER_AMQP_URL"}
    base = ["worker", "--app-dir", str(wapp.root), "--device", "cpu", "--metrics-port", "0"]
    base += ["--slide-root", str(tmp_path), "--output-root", str(tmp_path)]
    proc = tilerunner(*base, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "tilerunner: error: worker: no broker URL; pass --amqp or set TILERUNNER_AMQP_URL"
    )
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    proc = tilerunner(*base, "--amqp", url, "--broker-timeout", "1", "--log-format", "text")
    assert proc.returncode == 7, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tilerunner: error: no connection to the broker at amqp://guest:***@")
    assert "s3cret" not in proc.stderr


# --------------------------------------------------------------------------- real broker


def test_worker_the_broker_refuses_exits_with_one_line(
    rabbitmq: RabbitMQ, site: Callable[..., Site]
) -> None:
    bad = rabbitmq.url.replace("guest:guest@", "guest:wrong-s3cret@")
    w = site("refused").worker("--broker-timeout", "600", ready=False, url=bad)
    assert w.wait_exit() == 7  # at once: retrying a refused login does not help
    log = w.text()
    last = log.strip().splitlines()[-1]
    assert last.startswith("tilerunner: error: the broker at amqp://guest:***@127.0.0.1:")
    assert "refused the login" in last and "ACCESS_REFUSED" in last
    assert "wrong-s3cret" not in log

    w = site("mismatch", delivery_limit=10).worker("--delivery-limit", "5", ready=False)
    assert w.wait_exit() == 7
    last = w.text().strip().splitlines()[-1]
    assert last.startswith(
        "tilerunner: error: queue mismatch: the broker refused to declare it "
        "(406 PRECONDITION_FAILED"
    )
    assert last.endswith(
        "every worker of a queue needs the same --delivery-limit, and the queue must be a "
        "quorum queue declared by this worker version (delete it, or use a new --queue, "
        "after an upgrade)"
    )


def test_happy_path_idempotent_results_and_metrics(
    site: Callable[..., Site], flat_slide: Path, reference: Path
) -> None:
    s = site("happy")
    w = s.worker()
    out = s.out
    s.submit("case-1", flat_slide)
    (first,) = s.client.results(on_fail=w.tail)
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
    stages = {"slide_open", "tissue", "tiles", "write", "run", "commit", "total"}
    assert set(first["durations_s"]) == stages
    assert_same_outputs(out / "case-1" / "breast", reference / "breast")
    stored = json.loads((out / "case-1" / "job.json").read_text())["result"]
    assert stored == first  # job.json holds the result exactly as published
    assert_no_leftovers(out)  # the job's lock file is gone too

    # the same job id again: answered from the complete results, nothing recomputed
    before = (out / "case-1" / "breast" / "carcinoma.geojson").stat().st_mtime_ns
    s.submit("case-1", flat_slide)
    (again,) = s.client.results(on_fail=w.tail)
    assert again["status"] == "done" and again["reused"] is True
    assert again["files"] == first["files"] and again["summary"] == first["summary"]
    assert again["durations_s"] == first["durations_s"]  # those of the run that computed them
    assert (out / "case-1" / "breast" / "carcinoma.geojson").stat().st_mtime_ns == before
    assert_no_leftovers(out)

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
    assert s.client.depth() == 0

    w.proc.send_signal(signal.SIGTERM)  # idle: stops at once
    assert w.wait_exit() == 0
    assert w.events("stopped")


def test_malformed_jobs_are_dead_lettered_and_the_worker_goes_on(
    site: Callable[..., Site], blank_slide: Path
) -> None:
    s = site("malformed")
    w = s.worker()
    s.client.submit(b"{not json")
    s.submit("m-2", blank_slide, analyses=["lung"])
    s.client.submit({**job("m-3", blank_slide, s.out), "job_version": 2})
    s.submit("ok-4", blank_slide)
    dead = s.client.dead(3, on_fail=w.tail)
    reasons = [props.headers["x-tilerunner-reason"] for props, _body in dead]
    assert reasons[0].startswith("malformed job: the body is not JSON")
    assert reasons[1].startswith("malformed job: analyses ['lung'] are not in the config")
    assert reasons[2] == "malformed job: job_version 2 is not supported (this worker reads 1)"
    assert dead[0][1] == b"{not json"  # the job as it came
    assert all(props.headers["x-tilerunner-attempts"] == 1 for props, _ in dead)
    results = {r["job_id"]: r for r in s.client.results(4, on_fail=w.tail)}
    # every dead letter has its result; one without a valid job id names only its message
    unnamed = results[None]
    assert unnamed["status"] == "failed" and unnamed["reason"] == reasons[0]
    assert unnamed["message_id"] == "sha256:" + hashlib.sha256(b"{not json").hexdigest()
    assert results["m-2"]["status"] == "failed" and results["m-2"]["reason"] == reasons[1]
    assert results["m-3"]["status"] == "failed"
    assert results["ok-4"]["status"] == "done" and results["ok-4"]["tiles"] == 0
    assert w.metric("tilerunner_jobs_malformed_total") == 3
    assert w.proc.poll() is None
    assert not (s.out / "m-2").exists()


def test_permanent_errors_are_dead_lettered_at_once(
    site: Callable[..., Site], blank_slide: Path
) -> None:
    """A corrupt or missing slide, an output that is not a folder: retrying cannot help. A
    slide whose directory claims a 1,048,576 px tile (OpenSlide aborted the whole worker on
    it) is one of them: a job error, and the worker goes on."""
    s = site("permanent")
    w = s.worker("--max-attempts", "3")
    poison = s.slides / "poison.svs"
    poison.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    side = 1 << 20
    crafted = crafted_tiff(s.slides / "crafted.tiff", {TILE_WIDTH: side, TILE_LENGTH: side})
    (s.out / "a-file").write_text("not a folder\n")
    s.submit("p-1", poison)
    s.submit("p-2", s.slides / "missing.svs")
    s.submit("p-3", blank_slide, s.out / "a-file")
    s.submit("p-4", crafted)
    s.submit("ok-5", blank_slide)
    dead = s.client.dead(4, on_fail=w.tail)
    assert [json.loads(body)["job_id"] for _props, body in dead] == ["p-1", "p-2", "p-3", "p-4"]
    reasons = [props.headers["x-tilerunner-reason"] for props, _body in dead]
    prefix = "failed with a permanent error (not retried): "
    assert reasons[0].startswith(prefix + "SlideError: ") and str(poison) in reasons[0]
    assert reasons[1].startswith(prefix + "SlideError: ") and "missing.svs" in reasons[1]
    assert reasons[2].startswith(prefix + "OutputError: ") and "a-file" in reasons[2]
    assert reasons[3].startswith(
        f"{prefix}SlideError: slide {crafted} is not a slide this runner reads: image 0 "
        f"claims tiles of {side} x {side} px"
    )
    assert all(props.headers["x-tilerunner-attempts"] == 1 for props, _ in dead)
    results = s.client.results(5, on_fail=w.tail)
    assert [(r["status"], r["reason"], r["attempt"]) for r in results[:4]] == [
        ("failed", reason, 1) for reason in reasons
    ]
    assert results[4]["status"] == "done"  # the same worker, alive after the crafted slide
    assert w.proc.poll() is None and not w.events("broker_down")
    assert w.metric("tilerunner_jobs_failed_total", action="retry") == 0
    assert w.metric("tilerunner_jobs_failed_total", action="dead_letter") == 4
    assert s.client.depth() == 0 and s.client.depth(s.client.topology.results) == 0
    assert_no_leftovers(s.out)


def test_a_job_its_workers_die_on_is_given_up_by_the_broker_and_answered(
    site: Callable[..., Site], blank_slide: Path
) -> None:
    """The broker's delivery limit counts deliveries that ended with no answer (the worker
    died: SIGKILL, OOM); the job it gives up on gets its dead letter and its result."""
    s = site("limit", delivery_limit=2)
    c = s.client
    s.submit("dies-1", blank_slide)
    for attempt in range(2):  # a "worker" takes the job and dies (its channel closes)
        ch = c.conn.channel()
        method = wait_for(lambda ch=ch: ch.basic_get("limit")[0], "the job")  # type: ignore[misc]
        assert method.delivery_tag and (attempt == 0 or method.redelivered)
        ch.close()
    wait_for(lambda: c.depth(c.topology.undelivered) == 1, "the broker to give the job up")
    assert c.depth() == 0

    w = s.worker("--delivery-limit", "2")  # a worker answers for what the broker gave up on
    ((props, body),) = c.dead(on_fail=w.tail)
    assert json.loads(body)["job_id"] == "dies-1"  # the job as it was sent
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    reason = props.headers["x-tilerunner-reason"]
    assert reason.startswith("given up by the broker: delivered 2 time(s) without an answer")
    assert props.headers["x-tilerunner-attempts"] == 2
    assert props.headers["x-tilerunner-failures"] == 0  # deaths are not failures
    (result,) = c.results(on_fail=w.tail)
    assert (result["job_id"], result["status"], result["reason"]) == ("dies-1", "failed", reason)
    assert result["attempt"] == 2 and result["slide"] == str(blank_slide)
    assert w.metric("tilerunner_jobs_failed_total", action="dead_letter") == 1
    assert c.depth(c.topology.undelivered) == 0 and not (s.out / "dies-1").exists()


def test_sigterm_mid_job_finishes_it_within_the_grace_period(
    site: Callable[..., Site], flat_slide: Path, reference: Path
) -> None:
    s = site("term")
    w = s.worker("--batch-size", "4", "--grace", "120", delay=0.3)
    s.submit("t-1", flat_slide)
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait_exit() == 0, w.tail()
    (result,) = s.client.results(on_fail=w.tail)
    assert result["status"] == "done" and result["attempt"] == 1
    assert_same_outputs(s.out / "t-1" / "breast", reference / "breast")
    assert s.client.depth() == 0  # acked before the exit: nothing came back to the queue
    assert w.events("stopping") and w.events("job_done")
    assert_no_leftovers(s.out)


def test_sigterm_past_the_grace_period_requeues_the_job_cleanly(
    site: Callable[..., Site], flat_slide: Path, reference: Path
) -> None:
    s = site("requeue")
    w = s.worker("--batch-size", "4", "--grace", "0", delay=0.5)
    s.submit("r-1", flat_slide)
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait_exit() == 0, w.tail()
    assert w.events("job_requeued")
    wait_for(lambda: s.client.depth() == 1, "the job back in the queue, ready", on_fail=w.tail)
    assert not (s.out / "r-1").exists()
    assert_no_leftovers(s.out)

    w2 = s.worker()
    (result,) = s.client.results(on_fail=w2.tail)
    assert result["status"] == "done" and result["attempt"] == 2
    assert result["worker"].endswith(f":{w2.pid}")
    assert_same_outputs(s.out / "r-1" / "breast", reference / "breast")


def test_sigkill_mid_job_another_worker_completes_it_identically(
    site: Callable[..., Site], flat_slide: Path, reference: Path
) -> None:
    s = site("kill")
    pair = s.workers(2, "--batch-size", "4", delay=0.3)
    s.submit("k-1", flat_slide)

    def busy() -> Any:
        return next((w for w in pair if w.mid_job()), None)

    victim = wait_for(busy, "a worker to be under way", on_fail=s.tails)
    survivor = pair[1] if victim is pair[0] else pair[0]
    assert any(p.name.startswith(".k-1.partial-") for p in s.out.iterdir())  # half-written
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=WAIT)

    (result,) = s.client.results(on_fail=survivor.tail)
    assert result["status"] == "done" and result["attempt"] == 2
    assert result["worker"].endswith(f":{survivor.pid}")
    assert_same_outputs(s.out / "k-1" / "breast", reference / "breast")
    assert_no_leftovers(s.out)  # the dead worker's lock file was removed by the survivor
    assert s.client.depth() == 0
    survivor.proc.send_signal(signal.SIGTERM)
    assert survivor.wait_exit() == 0


def test_one_job_id_delivered_twice_at_once_is_computed_once(
    site: Callable[..., Site], flat_slide: Path, reference: Path
) -> None:
    """A producer that published a job twice: the second worker waits, then reuses."""
    s = site("dup")
    pair = s.workers(2)
    s.submit("d-1", flat_slide)
    s.submit("d-1", flat_slide)  # prefetch 1: the other worker takes this one
    results = s.client.results(2, on_fail=s.tails)
    assert [r["status"] for r in results] == ["done", "done"]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert len({r["worker"] for r in results}) == 2  # one delivery each, at the same time
    assert results[0]["files"] == results[1]["files"]
    assert sum(w.metric("tilerunner_jobs_failed_total", action="retry") for w in pair) == 0
    assert_same_outputs(s.out / "d-1" / "breast", reference / "breast")
    assert_no_leftovers(s.out)


def test_worker_reconnects_after_a_broker_restart_while_idle(
    rabbitmq: RabbitMQ, site: Callable[..., Site], blank_slide: Path
) -> None:
    s = site("restart")
    w = s.worker()
    rabbitmq.restart()
    wait_for(
        lambda: w.metric("tilerunner_broker_reconnects_total") >= 1,
        "the worker to reconnect",
        on_fail=w.tail,
    )
    w.wait_ready()
    assert w.events("broker_down")
    s.submit("after-restart", blank_slide)
    (result,) = s.client.results(on_fail=w.tail)
    assert result["status"] == "done"
    assert result["worker"].endswith(f":{w.pid}") and w.proc.poll() is None


def test_three_broker_restarts_during_one_job_use_up_none_of_its_attempts(
    rabbitmq: RabbitMQ, site: Callable[..., Site], flat_slide: Path, reference: Path, tmp_path: Path
) -> None:
    """Each restart returns the job the worker holds to the queue, and the quorum queue counts
    it as a delivery: with the old limit (max attempts - 1) the broker dead-lettered the job,
    with no result, while its first attempt was still computing. The job now finishes,
    commits, and its redelivery is answered from the results: one result, attempt 1, no
    failure, nothing dead-lettered. The job is held (test-only hold file) until the three
    restarts are done, so nothing here depends on how fast the broker restarts."""
    s = site("restarts")
    hold = tmp_path / "hold"
    hold.touch()
    w = s.worker("--max-attempts", "2", "--batch-size", "4", hold=hold)
    s.submit("long-1", flat_slide)
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    for restart in range(1, 4):
        assert w.metric("tilerunner_jobs_in_flight") == 1  # the first attempt still runs
        rabbitmq.restart()
        wait_for(
            lambda n=restart: w.metric("tilerunner_broker_reconnects_total") >= n,  # type: ignore[misc]
            f"the worker to reconnect after restart {restart}",
            on_fail=w.tail,
        )
        # the broker handed the job out again, to this worker (held while its orphan runs)
        wait_for(lambda: s.client.depth() == 0, "the job to be redelivered", on_fail=w.tail)
    hold.unlink()

    (result,) = s.client.results(on_fail=w.tail)
    assert result["status"] == "done", result
    assert result["attempt"] == 1 and result["reused"] is True  # computed once, by attempt 1
    assert_same_outputs(s.out / "long-1" / "breast", reference / "breast")
    wait_for(lambda: w.metric("tilerunner_jobs_done_total", reused="true") == 1, "the ack")
    # exactly one result: nothing left to answer, nothing given up on
    assert s.client.depth() == 0 and w.metric("tilerunner_jobs_in_flight") == 0
    for queue in (s.client.topology.results, s.client.topology.dead, s.client.topology.undelivered):
        assert s.client.depth(queue) == 0, queue
    starts = w.events("job_start")
    assert starts[0]["msg"].endswith("(attempt 1, 0 failed before)")
    assert all(e["msg"].endswith(", 0 failed before)") for e in starts)
    assert not w.events("job_retry") and not w.events("job_dead_lettered")
    assert len(w.events("job_orphaned")) == 1
    assert_no_leftovers(s.out)
