"""The worker's main loop: consume jobs, run one at a time, answer each delivery once.

The job runs in a thread while the main thread services the connection (heartbeats, acks,
signals), reaps the job's Outcome and answers its delivery (replies.py): done -> result and
ack; a permanent error -> dead letter; a transient one -> a retry after --retry-delay, up to
--max-attempts failures; cancelled on shutdown -> handed back. The loop also consumes
NAME.undelivered, the jobs the broker gave up on (topology.py), and gives each its dead letter
and `failed` result. A job whose connection was lost while it ran still finishes and commits;
its delivery is not answered (the broker redelivers it, and the redelivery is answered from
the stored results).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions

from tilerunner.errors import BrokerError
from tilerunner.worker.jobrunner import JobRunner
from tilerunner.worker.jobs import Job, MalformedJob, parse_job, readable_job_id
from tilerunner.worker.logs import line_of, one_line
from tilerunner.worker.metrics import Metrics
from tilerunner.worker.replies import Replies
from tilerunner.worker.results import Outcome
from tilerunner.worker.store import Roots
from tilerunner.worker.topology import (
    DEFAULT_DELIVERY_LIMIT,
    DELIVERIES_HEADER,
    Delivery,
    Topology,
    count_header,
)

log = logging.getLogger("tilerunner.worker")

TICK_S = 0.2  # the main loop services the connection at least this often
CANCEL_WAIT_S = 15.0  # after cancelling a job on shutdown, how long it may take to stop
JOB_THREAD_PREFIX = "tilerunner-job-"


@dataclass(frozen=True)
class WorkerSettings:
    """What `tilerunner worker` was told: the broker, the queue, retries, folders, metrics."""

    amqp_url: str
    queue: str
    prefetch: int = 1
    max_attempts: int = 3  # failed attempts (errors) of a job before it is dead-lettered
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT  # the broker's backstop (topology.py)
    grace_s: float = 25.0  # on SIGTERM, how long the current job may take to finish
    retry_delay_s: float = 5.0  # a failed attempt is handed back after this long
    broker_timeout_s: float = 300.0  # give up (exit 7) after this long without a connection
    metrics_host: str = "0.0.0.0"  # inside a container: reachable on its published port
    metrics_port: int = 9464  # 0: no HTTP server
    slide_roots: tuple[Path, ...] = (Path("/slides"),)  # job slides must lie in one of these
    output_root: Path = Path("/out")  # job outputs must lie in it; it holds the job locks

    @property
    def roots(self) -> Roots:
        """The allowed folders as the job store sees them."""
        return Roots(self.slide_roots, self.output_root)


def job_thread_alive() -> bool:
    """True while a job thread runs (the CLI then exits without the interpreter's clean-up)."""
    return any(t.name.startswith(JOB_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def redact(url: str) -> str:
    """The AMQP URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _refused(exc: BaseException) -> bool:
    """True for a login the broker refused (bad credentials or vhost): retrying will not help."""
    if isinstance(exc, pika.exceptions.AuthenticationError):
        return True
    # pika reports the broker's Connection.Close (403 ACCESS_REFUSED, 530 NOT_ALLOWED for a
    # vhost) inside Probable*Error or ConnectionClosedByBroker, as text
    text = str(exc)
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and (
        "ACCESS_REFUSED" in text or "NOT_ALLOWED" in text
    )


@dataclass
class _Active:
    delivery: Delivery
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    cancelled_at: float | None = None
    thread: threading.Thread | None = None


class _ConsumerGone(Exception):
    """The broker cancelled one of our consumers (e.g. the queue was deleted or moved)."""


class Worker:
    """Consumes jobs, runs them one at a time, publishes results, acks when durable."""

    def __init__(self, settings: WorkerSettings, runner: JobRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.topology = Topology(settings.queue, settings.delivery_limit)
        self.replies = Replies(self.topology, runner.worker_id)
        self.runner = runner
        self.metrics = metrics
        self.stopping = False
        self.hurry = False
        self.stop_at = 0.0
        self._noticed_stop = False
        self.conn: Any = None
        self.consumer_tags: tuple[str, ...] = ()
        self.current: _Active | None = None
        self.pending: deque[Delivery] = deque()
        self.undelivered: deque[Delivery] = deque()
        self.delayed: list[tuple[float, Delivery]] = []  # failed, republished when due
        self.connections = 0

    def request_stop(self, signum: int, frame: Any) -> None:
        """Signal handler: first signal stops taking jobs, a second one cancels the current."""
        if self.stopping:
            self.hurry = True
        else:
            self.stopping = True
            self.stop_at = time.monotonic()

    # ------------------------------------------------------------------ connection

    def serve(self) -> int:
        """Run until stopped (0) or the broker stays unreachable (BrokerError).

        Whatever ends it, a job still running is cancelled and its thread joined first:
        exiting while it is inside ONNX Runtime would abort the process (SIGABRT).
        """
        try:
            return self._serve()
        finally:
            self._stop_job_thread()

    def _stop_job_thread(self) -> None:
        a = self.current
        if a is None or a.thread is None or not a.thread.is_alive():
            return
        a.cancel.set()
        log.warning(
            "job %s: the worker is exiting; cancelling it (the broker hands it out again)",
            a.job.job_id,
            extra={"event": "job_cancel", "job_id": a.job.job_id},
        )
        a.thread.join(CANCEL_WAIT_S)
        if a.thread.is_alive():
            log.error(
                "job %s did not stop within %.0f s; exiting without it",
                a.job.job_id,
                CANCEL_WAIT_S,
                extra={"event": "job_abandoned", "job_id": a.job.job_id},
            )

    def _serve(self) -> int:
        failing_since: float | None = None
        backoff = 0.5
        last = ""
        while True:
            if self.stopping and self.current is None:
                log.info("stopped", extra={"event": "stopped"})
                return 0
            try:
                if not self.stopping:
                    self._connect()
                    failing_since, backoff = None, 0.5
                    self._loop()
                    self._close()
                    return 0
            except (pika.exceptions.AMQPError, OSError, _ConsumerGone) as exc:
                if _refused(exc):
                    raise BrokerError(
                        f"the broker at {redact(self.settings.amqp_url)} refused the login "
                        f"({line_of(exc)}); check the user, password and vhost of --amqp"
                    ) from None
                last = line_of(exc) if str(exc) else repr(exc)[:300]
                self._disconnected(last)
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > self.settings.broker_timeout_s and not self.stopping:
                raise BrokerError(
                    f"no connection to the broker at {redact(self.settings.amqp_url)} for "
                    f"{self.settings.broker_timeout_s:.0f} s (last: {last}); giving up"
                )
            self._offline_wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _connect(self) -> None:
        params = pika.URLParameters(self.settings.amqp_url)
        params.client_properties = {"connection_name": f"tilerunner worker {self.runner.worker_id}"}
        if params.blocked_connection_timeout is None:  # broker alarm: reconnect, do not hang
            params.blocked_connection_timeout = 60
        conn = pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            self._declare(channel)
            channel.basic_qos(prefetch_count=self.settings.prefetch)
            tags = (
                channel.basic_consume(self.topology.queue, self._on_job),
                channel.basic_consume(self.topology.undelivered, self._on_undelivered),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.conn, self.replies.channel, self.consumer_tags = conn, channel, tags
        self.connections += 1
        if self.connections > 1:
            self.metrics.reconnects.inc()
        self.metrics.connected.set(1)
        log.info(
            "consuming %s on %s (prefetch %d, max attempts %d, delivery limit %d)",
            self.topology.queue,
            redact(self.settings.amqp_url),
            self.settings.prefetch,
            self.settings.max_attempts,
            self.settings.delivery_limit,
            extra={"event": "consuming", "queue": self.topology.queue},
        )

    def _declare(self, channel: Any) -> None:
        try:
            self.topology.declare(channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerError(
                f"queue {self.topology.queue}: the broker refused to declare it "
                f"({exc.reply_code} {exc.reply_text}); every worker of a queue needs the "
                "same --delivery-limit, and the queue must be a quorum queue declared by "
                "this worker version (delete it, or use a new --queue, after an upgrade)"
            ) from None

    def _disconnected(self, reason: str) -> None:
        what = "lost the connection to" if self.conn is not None else "cannot connect to"
        log.warning(
            "%s the broker at %s (%s); retrying",
            what,
            redact(self.settings.amqp_url),
            reason,
            extra={"event": "broker_down", "reason": reason},
        )
        self.metrics.connected.set(0)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = self.replies.channel = None
        self.consumer_tags = ()
        # the broker requeues every unacked delivery of a closed channel
        self.pending.clear()
        self.undelivered.clear()
        self.delayed.clear()

    def _close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.metrics.connected.set(0)
        self.metrics.tick(connected=False, consuming=False)
        log.info("stopped", extra={"event": "stopped"})

    def _offline_wait(self, seconds: float) -> None:
        """Wait before reconnecting, still reaping and (on shutdown) cancelling the job."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.metrics.tick(connected=False, consuming=False, stopping=self.stopping)
            self._reap()
            if self.stopping:
                self._notice_stop()
                if self.current is None:
                    return
                self._shutdown_job()
            time.sleep(0.1)

    # ------------------------------------------------------------------ the loop

    def _on_job(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.pending.append(
            Delivery(channel, method.delivery_tag, bool(method.redelivered), properties, body)
        )

    def _on_undelivered(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.undelivered.append(
            Delivery(channel, method.delivery_tag, bool(method.redelivered), properties, body)
        )

    def _loop(self) -> None:
        consuming = True
        while True:
            self.conn.process_data_events(time_limit=TICK_S)
            self.metrics.tick(
                connected=True,
                consuming=consuming,
                stopping=self.stopping,
                job_id=self.current.job.job_id if self.current else None,
            )
            self._reap()
            while self.undelivered:
                self._give_up(self.undelivered.popleft())
            now = time.monotonic()
            for due, d in list(self.delayed):
                if self.stopping or now >= due:
                    self.delayed.remove((due, d))
                    self.replies.republish(d, failed=True)
            if self.stopping:
                if consuming:
                    self._stop_consuming()
                    consuming = False
                if self.current is None:
                    return
                self._shutdown_job()
                continue
            if not set(self.consumer_tags) <= set(self.replies.channel.consumer_tags):
                raise _ConsumerGone("the broker cancelled the consumer")
            if self.current is None and self.pending:
                self._start(self.pending.popleft())

    def _stop_consuming(self) -> None:
        """On shutdown: take no more jobs and hand back those held but not started."""
        self._notice_stop()
        for tag in self.consumer_tags:
            self.replies.channel.basic_cancel(tag)
        while self.pending:
            self.replies.republish(self.pending.popleft(), failed=False)

    def _notice_stop(self) -> None:
        if not self._noticed_stop:
            self._noticed_stop = True
            job = self.current.job.job_id if self.current else None
            log.info(
                "stop requested: taking no more jobs%s",
                f"; job {job} has {self.settings.grace_s:g} s to finish" if job else "",
                extra={"event": "stopping", "job_id": job},
            )

    def _shutdown_job(self) -> None:
        """On shutdown: cancel the job after the grace period; give up on it if it hangs."""
        a = self.current
        if a is None:
            return
        now = time.monotonic()
        if a.cancelled_at is None and (self.hurry or now - self.stop_at >= self.settings.grace_s):
            a.cancelled_at = now
            a.cancel.set()
            log.warning(
                "job %s: grace period over; cancelling it, it goes back to the queue",
                a.job.job_id,
                extra={"event": "job_cancel", "job_id": a.job.job_id},
            )
        if a.cancelled_at is not None and now - a.cancelled_at > CANCEL_WAIT_S:
            log.error(
                "job %s did not stop within %.0f s of its cancellation; handing it back",
                a.job.job_id,
                CANCEL_WAIT_S,
                extra={"event": "job_abandoned", "job_id": a.job.job_id},
            )
            self._requeue(a, counted=True)

    # ------------------------------------------------------------------ one job

    def _start(self, d: Delivery) -> None:
        try:
            job = parse_job(d.body, self.runner.config)
        except MalformedJob as exc:
            self.metrics.jobs_malformed.inc()
            log.warning(
                "%s",
                exc,
                extra={"event": "job_malformed", "job_id": exc.job_id, "reason": str(exc)},
            )
            self._dead_letter(d, str(exc), exc.job_id, None, failures=d.failures + 1)
            return
        a = _Active(d, job)
        self.current = a
        self.metrics.jobs_in_flight.set(1)
        self.metrics.tiles_per_s.set(0)
        log.info(
            "job %s: %s (attempt %d, %d failed before)",
            job.job_id,
            job.slide,
            d.attempt,
            d.failures,
            extra={"event": "job_start", "job_id": job.job_id, "attempt": d.attempt},
        )
        a.thread = threading.Thread(
            target=self._work, args=(a,), name=f"{JOB_THREAD_PREFIX}{job.job_id}", daemon=True
        )
        a.thread.start()

    def _work(self, a: _Active) -> None:
        d = a.delivery
        try:
            a.outcome = self.runner.execute(a.job, d.attempt, d.message_id, a.cancel)
        finally:
            if a.outcome is None:
                a.outcome = Outcome("failed", reason="internal error: the job thread died")
            a.finished.set()

    def _reap(self) -> None:
        a = self.current
        if a is None or not a.finished.is_set():
            return
        assert a.outcome is not None
        self.current = None
        self.metrics.jobs_in_flight.set(0)
        if not self.replies.live(a.delivery):
            log.warning(
                "job %s ended (%s) after its connection was lost: the broker redelivers "
                "it, and complete results are reused",
                a.job.job_id,
                a.outcome.status,
                extra={"event": "job_orphaned", "job_id": a.job.job_id},
            )
            return
        self._finish(a, a.outcome)

    def _finish(self, a: _Active, o: Outcome) -> None:
        d, job = a.delivery, a.job
        if o.status == "done" and o.result is not None:
            self.replies.done(o.result, d)
            self._count_done(o.result)
            log.info(
                "job %s done%s: %d tiles, results in %s",
                job.job_id,
                " (complete results reused)" if o.result.get("reused") else "",
                o.result["tiles"],
                o.result["output"],
                extra={"event": "job_done", "job_id": job.job_id, "attempt": d.attempt},
            )
        elif o.status == "cancelled":
            self._requeue(a)
        elif o.permanent or d.failures + 1 >= self.settings.max_attempts:
            self.metrics.jobs_failed.labels(action="dead_letter").inc()
            reason = (
                f"failed with a permanent error (not retried): {o.reason}"
                if o.permanent
                else f"failed {d.failures + 1} time(s), last: {o.reason}"
            )
            # a job id that names another job: this message's refusal, not that job's status
            job_id = None if o.id_taken else job.job_id
            self._dead_letter(d, reason, job_id, str(job.slide), failures=d.failures + 1)
        else:
            self._retry(d, job, o)

    def _count_done(self, result: dict[str, Any]) -> None:
        reused = bool(result.get("reused"))
        self.metrics.jobs_done.labels(reused=str(reused).lower()).inc()
        if not reused:
            for stage, seconds in result["durations_s"].items():
                if stage in ("slide_open", "tissue", "tiles", "write", "commit", "total"):
                    self.metrics.stage_s.labels(stage=stage).observe(seconds)

    def _retry(self, d: Delivery, job: Job, o: Outcome) -> None:
        self.metrics.jobs_failed.labels(action="retry").inc()
        log.warning(
            "job %s: failure %d of %d: %s; retrying in %g s",
            job.job_id,
            d.failures + 1,
            self.settings.max_attempts,
            o.reason,
            self.settings.retry_delay_s,
            extra={
                "event": "job_retry",
                "job_id": job.job_id,
                "attempt": d.attempt,
                "reason": o.reason,
            },
        )
        self.delayed.append((time.monotonic() + self.settings.retry_delay_s, d))

    def _requeue(self, a: _Active, counted: bool = False) -> None:
        """Hand an unfinished job back to the broker (shutdown).

        A job cancelled cleanly is republished (not a failure, not a delivery the broker's
        limit counts); one that would not stop is nacked, so that the broker's delivery limit
        catches a slide every worker hangs on.
        """
        self.current = None
        self.metrics.jobs_in_flight.set(0)
        d = a.delivery
        if self.replies.nack(d) if counted else self.replies.republish(d, failed=False):
            self.metrics.jobs_requeued.inc()
            log.info(
                "job %s handed back to the queue unfinished",
                a.job.job_id,
                extra={"event": "job_requeued", "job_id": a.job.job_id},
            )

    def _give_up(self, d: Delivery) -> None:
        """A job the broker dead-lettered at its delivery limit: to NAME.dead, with a result."""
        try:
            doc = json.loads(d.body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        slide = doc.get("slide") if isinstance(doc, dict) else None
        limit = self.topology.delivery_limit
        self.metrics.jobs_failed.labels(action="dead_letter").inc()
        self._dead_letter(
            d,
            f"given up by the broker: delivered {limit} time(s) without an answer (each time "
            "its worker died, was killed or lost the broker connection); see the workers' logs",
            readable_job_id(doc),
            one_line(slide, 300) if isinstance(slide, str) else None,
            failures=d.failures,
            attempts=count_header(d.headers, DELIVERIES_HEADER) + limit,
        )

    def _dead_letter(
        self,
        d: Delivery,
        reason: str,
        job_id: str | None,
        slide: str | None,
        *,
        failures: int,
        attempts: int | None = None,
    ) -> None:
        """Dead-letter `d` with its `failed` result (under `job_id`, or only its message)."""
        attempts = d.attempt if attempts is None else attempts
        result = self.runner.results.document(
            job_id, "failed", attempt=attempts, message_id=d.message_id, reason=reason, slide=slide
        )
        self.replies.dead_letter(d, reason, result, failures=failures, attempts=attempts)
