"""The queues of a job queue NAME, the headers the worker keeps on jobs, and one delivery.

    NAME              quorum queue of jobs; x-delivery-limit (the broker's poison-message
                      backstop, see below) and x-dead-letter-exchange NAME.undelivered
    NAME.undelivered  fanout exchange + quorum queue: jobs the broker gave up on; the workers
                      consume it, move each job to NAME.dead with a reason and publish its
                      `failed` result
    NAME.dead         fanout exchange + quorum queue: every job given up on, as it was sent,
                      with the reason in the header x-tilerunner-reason
    NAME.results      fanout exchange + quorum queue: one result per answered message

Two counts, kept apart. The job's failures (errors of an attempt) are counted by the worker
in the header x-tilerunner-failures of the copy it republishes for a retry, up to
--max-attempts. The broker counts deliveries of one copy that ended with no answer at all
(x-delivery-count): its worker died (SIGKILL, OOM, a crash in a native library) or the
connection was lost (a broker restart, the network). A worker that died cannot count; a
classic queue only flags `redelivered`, and a header counter needs a republish per attempt,
which a dead worker never does; so the quorum queue's delivery limit is the backstop against a
slide that kills every worker. It is generous (--delivery-limit, default 10) because a broker
restart during a long job returns that job to the queue too: it is no failure, and it must
not use up the job's attempts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

#: Deliveries of one copy of a job with no answer before the broker gives up on it.
DEFAULT_DELIVERY_LIMIT = 10
#: Headers the worker keeps on a job it republishes (retry, hand-back): failed attempts so
#: far, and deliveries of earlier copies of the job (the broker counts only this copy's).
FAILURES_HEADER = "x-tilerunner-failures"
DELIVERIES_HEADER = "x-tilerunner-deliveries"
#: Headers of a dead letter: why, after how many deliveries, by which worker.
REASON_HEADER = "x-tilerunner-reason"
ATTEMPTS_HEADER = "x-tilerunner-attempts"
WORKER_HEADER = "x-tilerunner-worker"


@dataclass(frozen=True)
class Topology:
    """The queues and exchanges of a job queue (see the module docstring)."""

    queue: str
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    @property
    def dead(self) -> str:
        """Exchange and queue of the jobs given up on."""
        return f"{self.queue}.dead"

    @property
    def results(self) -> str:
        """Exchange and queue of the result messages."""
        return f"{self.queue}.results"

    @property
    def undelivered(self) -> str:
        """Exchange and queue of the jobs the broker gave up on (its delivery limit)."""
        return f"{self.queue}.undelivered"

    def queue_arguments(self) -> dict[str, Any]:
        """The job queue's arguments (the broker refuses a redeclaration with others)."""
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit - 1,
            "x-dead-letter-exchange": self.undelivered,
        }

    def declare(self, channel: Any) -> None:
        """Declare everything (the broker refuses if the job queue exists with other args)."""
        for name in (self.dead, self.results, self.undelivered):
            channel.exchange_declare(name, "fanout", durable=True)
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(name, name)
        channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments())


def count_header(headers: dict[str, Any], name: str) -> int:
    """A non-negative count from a message header (0 if absent or not a count)."""
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass
class Delivery:
    """One message as the broker delivered it on a channel."""

    channel: Any
    tag: int
    redelivered: bool
    properties: Any
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers (a copy)."""
        return dict(self.properties.headers or {})

    @property
    def attempt(self) -> int:
        """Which delivery of the job this is: earlier copies' deliveries plus this copy's.

        The quorum queue counts this copy's deliveries in x-delivery-count (including those
        whose worker died); DELIVERIES_HEADER carries the count of copies the worker
        republished (retries, hand-backs).
        """
        count = self.headers.get("x-delivery-count")
        this_copy = count + 1 if isinstance(count, int) else 2 if self.redelivered else 1
        return count_header(self.headers, DELIVERIES_HEADER) + this_copy

    @property
    def failures(self) -> int:
        """Failed attempts before this delivery (a lost connection is not a failure)."""
        return count_header(self.headers, FAILURES_HEADER)

    @property
    def message_id(self) -> str:
        """The message's own identity: the producer's message id, else sha256 of the body."""
        given = self.properties.message_id
        if isinstance(given, str) and given:
            return given
        return "sha256:" + hashlib.sha256(self.body).hexdigest()
