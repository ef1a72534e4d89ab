"""The server's event scheduler on a simulated fleet's clock (pure: no I/O, no wall-clock reads of its own).

Each active device is *scheduled* (told to start at virtual time S from model version v), *promised* (it said
its update ``seq`` lands at virtual time T > S) or *delivered* (its update was processed; it waits for its next
schedule). Events are promised updates and one timer (FedBuff's window, or the sync round's deadline); the next
one is the smallest (time, update before timer, client id). Conservative synchronisation: an event at time t
is processed only once its update has arrived and no scheduled device can still deliver earlier (t <= every
scheduled start), so the order never depends on which message the broker delivered first.

Processing hands the update to a :class:`Sink` (the federation's buffer) at its virtual time and flushes by
the :class:`~fedhft.broker_server.flush_rules.FlushRule`:
- async (FedBuff): a device that delivered at T starts again at T, from the version current once every event
  at times <= T is processed (it keeps training instead of idling), unless the rule's caps
  (``rounds_per_version``, ``updates_per_flush``) say it has contributed enough: then it waits and starts at the
  next flush (a restarted server's clock starts the counts afresh);
- sync (rounds): the devices of a round wait and are all scheduled at the flush, from the new version; a
  straggler's late update goes into the next round's buffer and the straggler restarts at its arrival time.
When the whole fleet has been silent for ``timeout`` wall seconds (no hello, promise or update came and no event
was processed), every promise still waiting for its update and every schedule still waiting for its promise that
is older than that is dropped: those devices leave until they say hello again or an update of theirs arrives
(a late one, say one a broker restart lost and the device sent again). That is the only wall-clock
decision; a slow host (many devices training one after another) drops nobody while updates keep coming.
With ``fleet`` N, nothing is processed before N devices have said hello: a simulation's first round then does
not depend on which device process started first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from fedhft.broker_server.flush_rules import FlushRule

Item = TypeVar("Item")
Item_contra = TypeVar("Item_contra", contravariant=True)

SCHEDULED, PROMISED, DELIVERED = "scheduled", "promised", "delivered"
UPDATE, TIMER = 0, 1  # at equal times an update is processed before the timer (it still makes the flush)


@dataclass(frozen=True)
class Schedule:
    """Tell ``client_id`` to start its next round at virtual time ``start_at`` from model ``version``."""

    client_id: str
    start_at: float
    version: int


@dataclass(frozen=True)
class Processed:
    """The update ``seq`` of ``client_id`` went into the buffer at virtual time ``time``."""

    client_id: str
    seq: int
    time: float


@dataclass(frozen=True)
class Flushed:
    """The buffer (``updates`` of them) became ``version`` at virtual time ``time``."""

    time: float
    version: int
    updates: int


@dataclass(frozen=True)
class Dropped:
    """``client_id`` left: its promise (``seq``) or its schedule (``seq`` None) went unanswered."""

    client_id: str
    seq: int | None
    reason: str


Action = Schedule | Processed | Flushed | Dropped


class Sink(Protocol[Item_contra]):
    """Where processed updates go (the service: the federation's buffer, the coordinator's flush, the store)."""

    def process(self, item: Item_contra, time: float) -> None: ...

    def flush(self, time: float) -> int:
        """Aggregate the buffer at virtual ``time``; the version current afterwards."""
        ...

    def discard(self, item: Item_contra) -> None:
        """An arrived update that no promise will ever claim (its device was dropped or promised another)."""
        ...

    def decided(self, action: Action) -> None:
        """Every decision, as it is taken: a schedule right after the flush that made its version."""
        ...


@dataclass
class _Client:
    state: str
    start_at: float
    version: int
    since: float  # wall time the state began: the timeout counts from it
    seq: int = -1
    base_version: int = -1
    due: float = 0.0
    hello_again: bool = False  # said hello while promised: rescheduled at once if the promise is dropped
    finish_at: float | None = None  # delivered: scheduled at this time once it is closed (None: at the flush)


class VirtualClock(Generic[Item]):
    """Orders a simulated fleet's updates by virtual time and decides flushes and schedules.

    Feed it :meth:`hello`, :meth:`promise` and :meth:`arrive` in whatever order messages come, then call
    :meth:`advance`: it processes every event that can no longer be preceded and returns what it decided.
    """

    def __init__(
        self, rule: FlushRule, *, version: int = 0, now: float = 0.0, timeout: float = 300.0, fleet: int = 0
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"virtual timeout must be > 0 seconds, got {timeout}")
        if fleet < 0:
            raise ValueError(f"fleet must be >= 0 devices, got {fleet}")
        self.fleet = fleet
        self.registered: set[str] = set()  # every device that said hello
        self.rule = rule
        self.version = version
        self.now = now  # virtual time of the latest processed event
        self.timeout = timeout
        self.clients: dict[str, _Client] = {}
        self.arrived: dict[tuple[str, int], Item | None] = {}
        self.buffered: list[float] = []  # virtual times of the updates buffered since the last flush
        self.round_start = now
        self.expected: set[str] = set()  # sync: the devices the current round waits for
        self.delivered: set[str] = set()
        self.rounds_on: dict[str, int] = {}  # async: updates each device delivered trained from this version
        self.in_buffer: dict[str, int] = {}  # updates of each device in the buffer
        self.dropped = 0
        self._activity = -math.inf  # wall time of the latest input or processed event
        self._out: list[Action] = []
        self._sink: Sink[Item] | None = None  # during advance(): decisions go to it as they are taken
        self._discards: list[Item] = []

    # ---- inputs (any wall order) ------------------------------------------------------------------------
    def hello(self, client_id: str, wall: float) -> None:
        """A device (re)registered: a new or dropped one starts now; a scheduled one hears its schedule again."""
        self._activity = max(self._activity, wall)
        c = self.clients.get(client_id)
        if c is None:
            if self.rule.sync and self.now == self.round_start:
                self.expected.add(client_id)
            if client_id in self.registered:
                self._rejoin(client_id, wall)
            else:
                self._schedule(client_id, self.now, wall)
            self.registered.add(client_id)
        elif c.state == SCHEDULED:
            c.since = wall
            self._emit(Schedule(client_id, c.start_at, c.version))
        elif c.state == PROMISED:
            c.hello_again = True

    def promise(self, client_id: str, seq: int, base_version: int, due: float, wall: float) -> str | None:
        """Take a promise; the problem with it (one line) when it is ignored or adjusted, else None."""
        self._activity = max(self._activity, wall)
        c = self.clients.get(client_id)
        if c is None or c.state != SCHEDULED:
            if c is not None and c.state == PROMISED and c.seq == seq:
                return None  # delivered twice by the broker
            return f"promise of update {seq} from {client_id}, which has no schedule outstanding; ignored"
        problem = None
        earliest = math.nextafter(c.start_at, math.inf)
        if due < earliest:
            problem = f"promise of update {seq} from {client_id} is due at {due}, not after its start {c.start_at}"
            due = earliest
        c.state, c.seq, c.base_version, c.due, c.since, c.hello_again = PROMISED, seq, base_version, due, wall, False
        self._discard_held(client_id, below=seq)
        return problem

    def arrive(self, client_id: str, seq: int, item: Item | None, wall: float) -> None:
        """An accepted update (``item``), or None for one the server refused (its promised time still comes,
        with nothing to buffer): held until its promise's turn (an update may overtake its promise). A dropped
        device's update (a late one, or refused) shows it is alive: it is scheduled now."""
        self._activity = max(self._activity, wall)
        c = self.clients.get(client_id)
        if c is None and client_id in self.registered:
            self._rejoin(client_id, wall)
            c = self.clients[client_id]
        if c is None or c.state == DELIVERED:
            if item is not None:
                self._discards.append(item)
        else:
            self.arrived[(client_id, seq)] = item

    def resume(
        self, client_ids: Sequence[str], delivered: Mapping[str, float], buffered: Sequence[float], wall: float
    ) -> None:
        """A restarted server's fleet (the clock is new, at the restored version and time). ``buffered``: the
        virtual times of the restored, not yet aggregated updates (already in the buffer); a device in
        ``delivered`` (the time of its latest one) waits to be scheduled from there, as if the old process had
        just processed it. Every other device rejoins (the old process may have taken, and lost, its promise for a
        round starting now)."""
        self._activity = max(self._activity, wall)
        self.buffered = sorted(max(t, self.now) for t in buffered)
        sync = self.rule.sync
        for cid in sorted(client_ids):
            self.registered.add(cid)
            if sync:
                self.expected.add(cid)
            at = delivered.get(cid)
            if at is None:
                self._rejoin(cid, wall)
                continue
            self.clients[cid] = _Client(
                DELIVERED, at, self.version, wall, finish_at=None if sync else max(at, self.now)
            )
            if sync:
                self.delivered.add(cid)

    # ---- processing -----------------------------------------------------------------------------------
    def advance(self, wall: float, sink: Sink[Item]) -> list[Action]:
        """Process every event nothing can precede any more; the decisions taken since the last call."""
        for action in self._out:  # taken by hello() since the last call
            sink.decided(action)
        self._sink = sink
        try:
            self._run(wall, sink)
        finally:
            self._sink = None
        for item in self._discards:
            sink.discard(item)
        self._discards = []
        out, self._out = self._out, []
        return out

    def _run(self, wall: float, sink: Sink[Item]) -> None:
        if len(self.registered) < self.fleet:
            return  # the fleet is still starting
        self._expire(wall)
        if self._round_complete():
            self._flush(self.now, wall, sink)  # a dropped device was the last one the round waited for
        while True:
            self._close_finished(wall)
            event = self._next_event()
            if event is None or not self._ready(event):
                break
            self._process(event, wall, sink)
            self._activity = max(self._activity, wall)

    def blocked_on(self) -> str | None:
        """What the clock waits for (a line for logs), None when idle."""
        event = self._next_event()
        if event is None:
            return None
        t, kind, cid = event
        start = self._min_start()
        if t > start:
            waiting = sorted(c for c, s in self.clients.items() if s.state == SCHEDULED and s.start_at == start)
            return f"a promise from {waiting[0]} (scheduled at {start})"
        return f"the update of {cid} due at {t}" if kind == UPDATE else None

    def _emit(self, action: Action) -> None:
        self._out.append(action)
        if self._sink is not None:
            self._sink.decided(action)

    def _next_event(self) -> tuple[float, int, str] | None:
        events = [(c.due, UPDATE, cid) for cid, c in self.clients.items() if c.state == PROMISED]
        timer = self._timer()
        if timer is not None:
            events.append((timer, TIMER, ""))
        return min(events, default=None)

    def _timer(self) -> float | None:
        if not self.rule.sync:
            return self.rule.window_closes_at(self.buffered[0] if self.buffered else None)
        closes = self.rule.round_closes_at(self.round_start)
        if closes is None:
            return None
        if self.buffered:
            return max(closes, self.buffered[0])
        return closes if self.expected - self.delivered else None

    def _min_start(self) -> float:
        return min((c.start_at for c in self.clients.values() if c.state == SCHEDULED), default=math.inf)

    def _ready(self, event: tuple[float, int, str]) -> bool:
        t, kind, cid = event
        if t > self._min_start():  # a scheduled device may still promise an earlier update
            return False
        return kind == TIMER or (cid, self.clients[cid].seq) in self.arrived

    def _process(self, event: tuple[float, int, str], wall: float, sink: Sink[Item]) -> None:
        t, kind, cid = event
        self.now = t
        if kind == TIMER:
            self._flush(t, wall, sink)
            return
        c = self.clients[cid]
        item = self.arrived.pop((cid, c.seq))
        if item is not None:
            sink.process(item, t)
            self.buffered.append(t)
            self.in_buffer[cid] = self.in_buffer.get(cid, 0) + 1
        self._emit(Processed(cid, c.seq, t))
        self._discard_held(cid, below=c.seq)
        c.state = DELIVERED
        if not self.rule.sync:
            c.finish_at = t
            if self.buffered and self.rule.buffer_due(len(self.buffered), self.buffered[0], t):
                self._flush(t, wall, sink)
                return
            if c.version == self.version:  # trained from the current version: counts against its cap
                self.rounds_on[cid] = self.rounds_on.get(cid, 0) + 1
            if self.rule.waits_for_flush(self.rounds_on.get(cid, 0), self.in_buffer.get(cid, 0)):
                c.finish_at = None  # scheduled by the next flush
                if not self._anyone_training():
                    self._flush(t, wall, sink)  # every device waits: nothing else can come first
            return
        if cid in self.expected or c.base_version == self.version:  # trained on this round's model: waits
            c.finish_at = None
            self.delivered.add(cid)
        else:  # a straggler of an earlier round: its update counts in this one, it restarts at once
            c.finish_at = t
        if self._round_complete():
            self._flush(t, wall, sink)

    def _round_complete(self) -> bool:
        """Sync: every expected device delivered (something buffered, or refused updates to reschedule)."""
        return self.rule.sync and bool(self.buffered or self.delivered) and self.expected <= self.delivered

    def _flush(self, t: float, wall: float, sink: Sink[Item]) -> None:
        """Flush what is buffered; the devices waiting for it (a sync round's, or async ones at their cap) start
        their next round at ``t``, and a sync round ends."""
        updates, self.buffered = len(self.buffered), []
        if updates:
            self.version = sink.flush(t)
            self._emit(Flushed(t, self.version, updates))
        waiting = sorted(cid for cid, c in self.clients.items() if c.state == DELIVERED and c.finish_at is None)
        for cid in waiting:
            self._schedule(cid, t, wall)
        self.rounds_on.clear()
        self.in_buffer.clear()
        if self.rule.sync:
            self._new_round(t, set(waiting))

    def _anyone_training(self) -> bool:
        """Some device is scheduled, promised, or delivered and about to start again."""
        return any(c.state != DELIVERED or c.finish_at is not None for c in self.clients.values())

    def _new_round(self, t: float, expected: set[str]) -> None:
        self.round_start, self.expected, self.delivered = t, expected, set()

    def _close_finished(self, wall: float) -> None:
        """Schedule devices that delivered at a time T once no event at a time <= T can still come."""
        finished = sorted(
            (c.finish_at, cid) for cid, c in self.clients.items() if c.state == DELIVERED and c.finish_at is not None
        )
        if not finished:
            return
        event = self._next_event()
        upcoming = math.inf if event is None else event[0]
        for t, cid in finished:
            if not (t < upcoming and t <= self._min_start()):
                break
            self._schedule(cid, t, wall)

    def _rejoin(self, client_id: str, wall: float) -> None:
        """A device the clock dropped (or a restarted server's) starts a new round just after now: the device
        never runs a schedule it acted on twice, and it may have acted on one at (now, version) already."""
        self._schedule(client_id, math.nextafter(self.now, math.inf), wall)

    def _schedule(self, client_id: str, start_at: float, wall: float) -> None:
        self.clients[client_id] = _Client(SCHEDULED, start_at, self.version, wall)
        self._emit(Schedule(client_id, start_at, self.version))

    # ---- dropping -------------------------------------------------------------------------------------
    def _expire(self, wall: float) -> None:
        if wall - self._activity <= self.timeout:
            return
        for cid in sorted(self.clients):
            c = self.clients[cid]
            if wall - c.since <= self.timeout:
                continue
            if c.state == PROMISED and (cid, c.seq) not in self.arrived:
                self._drop(cid, c, c.seq, f"no update {c.seq} within {self.timeout:g} s of its promise", wall)
            elif c.state == SCHEDULED:
                self._drop(cid, c, None, f"no promise within {self.timeout:g} s of its schedule", wall)
        self._activity = wall  # whoever is left gets a fresh timeout

    def _drop(self, cid: str, c: _Client, seq: int | None, reason: str, wall: float) -> None:
        self.dropped += 1
        self._emit(Dropped(cid, seq, reason))
        del self.clients[cid]
        self.expected.discard(cid)
        self._discard_held(cid, below=math.inf)
        if c.hello_again:
            self._schedule(cid, max(self.now, c.start_at), wall)

    def _discard_held(self, cid: str, below: float) -> None:
        """Let go of held updates of ``cid`` with a seq below ``below``: no promise will claim them."""
        for key in sorted(k for k in self.arrived if k[0] == cid and k[1] < below):
            item = self.arrived.pop(key)
            if item is not None:
                self._discards.append(item)
