"""The final reply: a finished job told to the agent that submitted it over MQTT, once.

The job row is the outbox. A job an agent submitted over MQTT carries its submit's request_id
(`reply_to`, store migration 9); once the job is completed, failed or cancelled, by whatever
ends it (a node's result, its replicas' verdict, one lost attempt too many, the liveness sweep,
a cancel over REST, a service's billing), it owes that agent one final `reply` until
`final_sent_at` is set. So no path of the market has to remember to announce it, and the
market knows nothing of MQTT.

At the end of every batch of the bridge, in its transaction (`step`):

1. finals the broker has acknowledged (PUBACK) are marked sent: from then on the hub's books
   say delivered, and the job is never announced again;
2. finals owed and not in flight are built (the job as `GET /api/v1/jobs/<id>` shows it) and
   queued; the bridge publishes them (QoS 1) once the batch has committed, so a final never
   tells of a finish that was rolled back, and hands paho's receipt back (`sent`).

A final still unacknowledged after `resend_after_s` (the broker was away, the publish failed)
is sent again, and after a hub restart nothing is in flight: every final owed goes out with the
first batch (the ticker runs one within a second). On the wire that is at least once (a crash
or a lost connection between the publish and its mark sends it again, and QoS 1 may deliver a
duplicate of its own); the agent drops a duplicate by the job id. In the hub's books it is once
per job. docs/protocol.md, "The final reply", is the agent's side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from edge.core import protocol
from hub.market.jobs import Jobs
from hub.store.rows import Store

log = logging.getLogger("hub.mqtt.bridge")

FINAL = "final"  # the field that tells a job's final reply from the answer to its submit
DONE = ("completed", "failed", "cancelled")


def final_reply(request_id: str, job: dict[str, Any]) -> dict[str, Any]:
    """The final reply for a finished job (its view): `ok` when it completed, as for a call."""
    msg: dict[str, Any] = protocol.reply(request_id, job["state"] == "completed", job)
    msg[FINAL] = True
    return msg


def _acknowledged(receipt: Any) -> bool:
    """Has the broker acknowledged this publish (paho's MQTTMessageInfo)? A publish that
    failed (None), or one paho queued while disconnected (it raises then), has not yet."""
    if receipt is None:
        return False
    try:
        return bool(receipt.is_published())
    except (RuntimeError, ValueError):
        return False


class Finals:
    """The finals owed, in flight and acknowledged. Used by the bridge on the loop's thread."""

    def __init__(
        self, store: Store, jobs: Jobs, resend_after_s: float = 30.0, max_per_batch: int = 256
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.resend_after_s = resend_after_s
        self.max_per_batch = max_per_batch  # a backlog (after an outage) goes out over batches
        # job id -> (paho's receipt or None when the publish raised, when it was sent)
        self._in_flight: dict[str, tuple[Any, float]] = {}
        self.resent = 0  # finals sent again for want of an acknowledgement (for tests, logs)

    def step(self, queue: Callable[[str, str, dict[str, Any]], None]) -> int:
        """Inside the batch's transaction: mark what the broker acknowledged, and queue (job
        id, topic, message) for each final owed and not in flight. Returns how many."""
        now = time.monotonic()
        acked = [j for j, (receipt, _) in self._in_flight.items() if _acknowledged(receipt)]
        if acked:
            self.store.finals_sent(acked, self.jobs.clock())
            for job_id in acked:
                del self._in_flight[job_id]
        for job_id, (_, at) in list(self._in_flight.items()):
            if now - at > self.resend_after_s:
                log.warning("the final reply for job %s was not acknowledged; sending it again",
                            job_id)  # fmt: skip
                del self._in_flight[job_id]
                self.resent += 1
        n = 0
        for job in self.store.finals_owed(self.max_per_batch + len(self._in_flight)):
            if n >= self.max_per_batch:
                break
            job_id = str(job["id"])
            if job_id in self._in_flight:
                continue
            try:
                msg = final_reply(str(job["reply_to"]), self.jobs.view(job))
            except Exception:  # one bad row must not hold up the others' finals
                log.exception("the final reply for job %s could not be built; trying again"
                              " in %g s", job_id, self.resend_after_s)  # fmt: skip
                self._in_flight[job_id] = (None, now)
                continue
            queue(job_id, protocol.agent_topic(str(job["owner"]), protocol.REPLY), msg)
            n += 1
        return n

    def sent(self, job_id: str, receipt: Any) -> None:
        """After the commit: the final for job_id was handed to paho (receipt), or its publish
        raised (None: sent again after resend_after_s)."""
        self._in_flight[job_id] = (receipt, time.monotonic())

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
