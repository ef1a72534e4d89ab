"""Rounds on the virtual clock (`fedhft edge run --virtual-time`, what `fedhft simulate` runs): no sleeping.

A round: wait for the server's schedule (start S, model version v) -> wait until model v (or a newer one) is
held -> promise, before training, that the update lands at S + d, where d = download(model) + steps x the
planned step time + upload(update) is known from the plan (sim_clock.py) -> train -> send the update stamped
``virtual_time`` = S + d. The server orders updates by these times, so host load changes how long a run takes,
never what it computes. A schedule already acted on (redelivered after a reconnect, or retained) is not run
twice: the last one taken is kept in state.json. ``until_version`` / ``until_time`` end the device's run: a
schedule from that model version, or starting at that virtual time, or later, is declined, and the device
leaves by promising its next update at the end of virtual time (:data:`LEAVE_AT`, the largest due the contract
takes), so the server never waits on it and processes every earlier event; it then exits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fedhft.edge_runtime.full_update import AnySpec
from fedhft.edge_runtime.mqtt_link import Delivered, MqttLink
from fedhft.edge_runtime.sim_clock import DeviceTimes, payload_bytes, planned_payload_bytes
from fedhft.edge_runtime.state import EdgeState
from fedhft.logs import event
from fedhft.protocol import ModelMessage, ProtocolError
from fedhft.protocol.topics import promise_topic, schedule_topic
from fedhft.protocol.virtual_time import PromiseMessage, ScheduleMessage, decode_schedule, encode_promise

log = logging.getLogger("fedhft.edge_runtime.client")  # the edge client's log, whichever part of it speaks
LEAVE_AT = 1e12  # the end of virtual time: a device that stops promises its next update there


@dataclass(frozen=True)
class VirtualRound:
    """One round's place on the virtual clock."""

    start: float
    duration: float

    @property
    def due(self) -> float:
        return self.start + self.duration

    def metrics(self) -> dict[str, float]:
        """What the update carries: when it lands (the server's ``virtual_time``), and the round's parts."""
        return {"virtual_time": self.due, "virtual_start": self.start, "virtual_duration": self.duration}


def round_on_clock(
    times: DeviceTimes, start: float, model: ModelMessage, steps: int, update_bytes: int
) -> VirtualRound:
    """The round that starts at virtual time ``start`` on ``model``: download, ``steps`` steps, upload."""
    return VirtualRound(start, times.round_seconds(payload_bytes(model.tensors), steps, update_bytes))


class VirtualRounds:
    """The schedules a device is given, and the promises it makes (one device, one task)."""

    def __init__(
        self,
        task: str,
        client_id: str,
        spec: AnySpec,
        times: DeviceTimes,
        state: EdgeState,
        *,
        until_version: int | None = None,
        until_time: float | None = None,
    ) -> None:
        self.task, self.client_id, self.times, self.state = task, client_id, times, state
        self.update_bytes = planned_payload_bytes(spec.update_shapes())
        self.until_version, self.until_time = until_version, until_time
        self.pending: ScheduleMessage | None = None
        self.link: MqttLink | None = None
        last = state.last_schedule
        self.finished = last is not None and self._beyond_bounds(float(last[0]), int(last[1]))  # no more rounds
        self.left = self.finished  # the broker took the promise to leave (or an earlier run left already)

    def topics(self) -> list[str]:
        return [schedule_topic(self.task, self.client_id)]

    def on_schedule(self, payload: bytes) -> None:
        """Take a schedule; one already acted on, or older than the pending one, is ignored."""
        try:
            msg = decode_schedule(payload, expected_task=self.task, expected_client_id=self.client_id)
        except ProtocolError as e:
            event(log, "ignoring a malformed schedule", logging.WARNING, error=str(e))
            return
        if self.state.last_schedule == [msg.start_at, msg.version]:
            return  # redelivered: this round was trained already
        if self.pending is not None and msg.start_at < self.pending.start_at:
            return
        if self._beyond_bounds(msg.start_at, msg.version):
            event(log, "schedule past this run's end: leaving", start_at=msg.start_at, version=msg.version)
            self.finished, self.pending = True, None
            self.state.last_schedule = [msg.start_at, msg.version]
            self._leave(msg.version)
            return
        self.pending = msg

    def _beyond_bounds(self, start_at: float, version: int) -> bool:
        late = self.until_time is not None and start_at >= self.until_time
        return late or (self.until_version is not None and version >= self.until_version)

    def _leave(self, version: int) -> None:
        if self.link is None:
            return
        seq = self.state.next_seq
        msg = PromiseMessage(self.task, self.client_id, seq, version, LEAVE_AT, time.time())
        self.link.publish(promise_topic(self.task, self.client_id), encode_promise(msg), qos=1, token=("leave", seq))

    def on_delivered(self, ev: Delivered) -> None:
        if isinstance(ev.token, tuple) and ev.token[0] == "leave" and ev.ok:
            self.left = True

    def ready(self, model: ModelMessage | None) -> ScheduleMessage | None:
        """The pending schedule once the model it names (or a newer one) is held, else None."""
        if self.pending is None or model is None or model.version < self.pending.version:
            return None
        return self.pending

    def begin(self, schedule: ScheduleMessage, model: ModelMessage, steps: int) -> VirtualRound:
        """The round of ``schedule`` on ``model``, before training."""
        if model.version != schedule.version:
            event(
                log,
                "training a newer model than scheduled",
                logging.WARNING,
                version=model.version,
                at=schedule.version,
            )
        return round_on_clock(self.times, schedule.start_at, model, steps, self.update_bytes)

    def promise(self, rnd: VirtualRound, seq: int, base_version: int) -> tuple[str, bytes]:
        """(topic, payload) of the promise that update ``seq`` lands at ``rnd.due``."""
        msg = PromiseMessage(self.task, self.client_id, seq, base_version, rnd.due, time.time())
        return promise_topic(self.task, self.client_id), encode_promise(msg)

    def taken(self, schedule: ScheduleMessage) -> None:
        """``schedule``'s round is over (its update created, or none could be): never run it again."""
        self.state.last_schedule = [schedule.start_at, schedule.version]
        if self.pending == schedule:
            self.pending = None
