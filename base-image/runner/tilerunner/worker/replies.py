"""Answering a delivery: a result, a retry, a hand-back or a dead letter; the ack comes last.

Everything is published with publisher confirms before the delivery is acked, so a crash in
between repeats a message (the job id lock and stored results make a repeated job a reuse; a
repeated result has the same job_id and message_id) but never loses one. A delivery whose
channel is gone is not answered at all: the broker has already requeued it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pika

from tilerunner.worker.logs import one_line
from tilerunner.worker.results import RESULT_VERSION
from tilerunner.worker.topology import (
    ATTEMPTS_HEADER,
    DELIVERIES_HEADER,
    FAILURES_HEADER,
    REASON_HEADER,
    WORKER_HEADER,
    Delivery,
    Topology,
)

log = logging.getLogger("tilerunner.worker")


def _properties(**kwargs: Any) -> Any:
    return pika.BasicProperties(
        delivery_mode=2, app_id="tilerunner", timestamp=int(time.time()), **kwargs
    )


class Replies:
    """Publishes on the current channel (None while disconnected) for one job queue."""

    def __init__(self, topology: Topology, worker_id: str) -> None:
        self.topology = topology
        self.worker_id = worker_id
        self.channel: Any = None

    def live(self, d: Delivery) -> bool:
        """True if `d` came on the current channel (else the broker has requeued it)."""
        return d.channel is self.channel

    def result(self, doc: dict[str, Any], d: Delivery) -> None:
        """Publish a result message for `d` (confirmed); the caller acks."""
        headers = {"status": doc["status"], "message_id": doc["message_id"]}
        if doc["job_id"] is not None:
            headers["job_id"] = doc["job_id"]
        props = _properties(
            content_type="application/json",
            type=f"tilerunner.result.v{RESULT_VERSION}",
            correlation_id=d.properties.correlation_id or doc["job_id"] or doc["message_id"],
            headers=headers,
        )
        body = json.dumps(doc, sort_keys=True).encode()
        d.channel.basic_publish(
            self.topology.results, self.topology.queue, body, props, mandatory=True
        )

    def done(self, doc: dict[str, Any], d: Delivery) -> None:
        """Publish the result of a finished job, then ack its delivery."""
        self.result(doc, d)
        d.channel.basic_ack(d.tag)

    def nack(self, d: Delivery) -> bool:
        """Hand `d` back as it is (the broker's delivery count grows); False if gone."""
        if not self.live(d):
            return False
        d.channel.basic_nack(d.tag, requeue=True)
        return True

    def republish(self, d: Delivery, *, failed: bool) -> bool:
        """Put a fresh copy of the job at the end of the queue, then ack this delivery.

        The copy carries the failures so far (one more if `failed`) and the deliveries so
        far in headers, so the broker's delivery limit counts only deliveries that ended with
        no answer at all. Published with confirms before the ack: at worst the job is there
        twice, and the job-id lock and stored results make the second a reuse.
        """
        if not self.live(d):
            return False
        headers = {k: v for k, v in d.headers.items() if k not in ("x-delivery-count", "x-death")}
        headers[FAILURES_HEADER] = d.failures + (1 if failed else 0)
        headers[DELIVERIES_HEADER] = d.attempt
        props = _properties(
            content_type=d.properties.content_type,
            message_id=d.properties.message_id,
            correlation_id=d.properties.correlation_id,
            headers=headers,
        )
        d.channel.basic_publish("", self.topology.queue, d.body, props, mandatory=True)
        d.channel.basic_ack(d.tag)
        return True

    def dead_letter(
        self, d: Delivery, reason: str, result: dict[str, Any], *, failures: int, attempts: int
    ) -> None:
        """Publish the job as it came to NAME.dead with the reason, then its `failed`
        result, then ack: every dead letter has its result, whoever gave the job up."""
        headers = {k: v for k, v in d.headers.items() if k != "x-delivery-count"}
        headers.update(
            {
                REASON_HEADER: one_line(reason),
                ATTEMPTS_HEADER: attempts,
                FAILURES_HEADER: failures,
                WORKER_HEADER: self.worker_id,
            }
        )  # the dead-letter queue counts its own deliveries
        props = _properties(
            content_type=d.properties.content_type,
            message_id=d.properties.message_id,
            correlation_id=d.properties.correlation_id,
            headers=headers,
        )
        d.channel.basic_publish(
            self.topology.dead, self.topology.queue, d.body, props, mandatory=True
        )
        self.result(result, d)
        d.channel.basic_ack(d.tag)
        log.error(
            "job %s dead-lettered: %s",
            result["job_id"] or f"(message {result['message_id']})",
            result["reason"],
            extra={
                "event": "job_dead_lettered",
                "job_id": result["job_id"],
                "reason": result["reason"],
                "attempt": attempts,
            },
        )
