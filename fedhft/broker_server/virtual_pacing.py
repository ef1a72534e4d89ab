"""The server on a simulated fleet's clock (``fedhft server run --virtual-time``; `fedhft simulate` only).

The I/O shell of virtual_clock.py: it decodes the devices' promises, takes registrations and accepted updates
from ingest (which holds updates here instead of buffering them), and carries out the clock's decisions: an
update enters the federation's buffer stamped with its virtual time, a flush goes through the coordinator
(the version is stamped with the flush's virtual time), a schedule is published on the device's schedule
topic right after the models of its version, an update that no promise will claim is marked rejected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fedhft.broker_server.coordinator import Coordinator
from fedhft.broker_server.federation import Federation, PendingUpdate
from fedhft.broker_server.flush_rules import FlushRule
from fedhft.broker_server.ingest import Inbound
from fedhft.broker_server.metrics import Metrics
from fedhft.broker_server.publisher import Outbound
from fedhft.broker_server.state_backend import StateBackend
from fedhft.broker_server.state_dir import StateError
from fedhft.broker_server.virtual_clock import Action, Dropped, Flushed, Schedule, VirtualClock
from fedhft.logs import event
from fedhft.protocol import ProtocolError, parse_topic
from fedhft.protocol.topics import schedule_topic
from fedhft.protocol.virtual_time import ScheduleMessage, decode_promise, encode_schedule

log = logging.getLogger("fedhft.server")

PROMISE_MAX_BYTES = 4096
EXPIRED = "expired"  # the reason an update is rejected with when no promise claims it


class VirtualPacing:
    """Feeds the virtual clock from the broker and carries out what it decides (the clock's Sink)."""

    def __init__(
        self,
        task: str,
        federation: Federation,
        coordinator: Coordinator,
        store: StateBackend,
        metrics: Metrics,
        out: Outbound,
        rule: FlushRule,
        timeout: float,
        fleet: int = 0,
    ) -> None:
        self.task = task
        self.federation = federation
        self.coordinator = coordinator
        self.store = store
        self.metrics = metrics
        self.out = out
        self.clock: VirtualClock[PendingUpdate] = VirtualClock(
            rule, version=federation.version, now=federation.virtual_time, timeout=timeout, fleet=fleet
        )

    # ---- inputs -----------------------------------------------------------------------------------------
    def registered(self, client_id: str) -> None:
        """Ingest accepted a hello: a new (or dropped) device starts at the current virtual time."""
        self.clock.hello(client_id, time.time())

    def resume(self, client_ids: Sequence[str]) -> None:
        """After a restart the clock starts empty: the devices the state knows start again just after the
        restored virtual time (VirtualClock.resume), except those with a restored, not yet aggregated update,
        which are scheduled at its time."""
        pending = [p for p in self.federation.pending if p.virtual_time > 0]
        delivered: dict[str, float] = {}
        for p in pending:
            delivered[p.client_id] = max(delivered.get(p.client_id, 0.0), p.virtual_time)
        self.clock.resume(client_ids, delivered, [p.virtual_time for p in pending], time.time())

    def hold(self, pending: PendingUpdate) -> None:
        """Ingest accepted and stored an update: it waits for its promised time."""
        self.clock.arrive(pending.client_id, pending.seq, pending, time.time())

    def refused(self, client_id: str, seq: int) -> None:
        """Ingest rejected an update: its promised time still comes (and the device is rescheduled), empty."""
        self.clock.arrive(client_id, seq, None, time.time())

    def handle_promises(self, batch: Sequence[Inbound]) -> None:
        """Decode and take promises; a bad one costs one log line, never the server."""
        for msg in batch:
            try:
                _, _, topic_client = parse_topic(msg.topic)
                promise = decode_promise(msg.payload, PROMISE_MAX_BYTES, expected_task=self.task)
                if promise.client_id != topic_client:
                    raise ProtocolError(f"promise of {promise.client_id!r} on the topic of {topic_client!r}")
            except (ProtocolError, ValueError, TypeError) as exc:
                event(log, "promise rejected", logging.WARNING, topic=msg.topic, error=exc)
            else:
                problem = self.clock.promise(
                    promise.client_id, promise.seq, promise.base_version, promise.due, msg.received_at
                )
                if problem:
                    event(log, "promise adjusted or ignored", logging.WARNING, problem=problem)
            self.out.ack(msg.mid, msg.qos)

    def advance(self, wall: float) -> list[Action]:
        """Process what the clock can; its decisions are carried out as they are taken (see :meth:`decided`)."""
        return self.clock.advance(wall, self)

    # ---- the clock's Sink -------------------------------------------------------------------------------
    def process(self, item: PendingUpdate, time: float) -> None:
        item.virtual_time = time
        self.federation.add_pending(item)

    def flush(self, time: float) -> int:
        self.coordinator.aggregate_and_publish(virtual_time=time)
        return self.federation.version

    def discard(self, item: PendingUpdate) -> None:
        try:
            self.store.mark_rejected([item.id], EXPIRED)
        except StateError as exc:
            event(log, "could not mark an unclaimed update rejected", logging.ERROR, id=item.id, error=exc)
        self.metrics.inc("fedhft_updates_total", {"status": "dropped", "reason": EXPIRED})

    def decided(self, action: Action) -> None:
        if isinstance(action, Schedule):
            msg = ScheduleMessage(self.task, action.client_id, action.start_at, action.version, time.time())
            self.out.publish(schedule_topic(self.task, action.client_id), encode_schedule(msg))
            event(log, "scheduled", logging.DEBUG, client=action.client_id, at=action.start_at, version=action.version)
        elif isinstance(action, Dropped):
            self.metrics.inc("fedhft_virtual_dropped_total")
            event(log, "device dropped", logging.WARNING, client=action.client_id, reason=action.reason)
        elif isinstance(action, Flushed):
            self.metrics.set("fedhft_virtual_time", action.time)
