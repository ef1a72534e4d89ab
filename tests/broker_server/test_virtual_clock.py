"""The virtual clock as pure functions: processing order, flushes and schedules of a hand-built fleet."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from fedhft.broker_server.flush_rules import FlushRule, FlushRuleError
from fedhft.broker_server.virtual_clock import Action, Dropped, Flushed, Processed, Schedule, VirtualClock


@dataclass
class Buffer:
    """A sink like the federation's: a buffer of (client, seq) at virtual times; a flush makes a version."""

    version: int = 0
    buffer: list[tuple[str, int, float]] = field(default_factory=list)
    flushes: list[tuple[float, list[tuple[str, int, float]]]] = field(default_factory=list)
    discarded: list[tuple[str, int]] = field(default_factory=list)
    seen: list[Action] = field(default_factory=list)

    def process(self, item: tuple[str, int], time: float) -> None:
        self.buffer.append((*item, time))

    def flush(self, time: float) -> int:
        self.flushes.append((time, self.buffer))
        self.buffer = []
        self.version += 1
        return self.version

    def discard(self, item: tuple[str, int]) -> None:
        self.discarded.append(item)

    def decided(self, action: Action) -> None:
        self.seen.append(action)


@dataclass
class Fleet:
    """Simulated devices: each round takes ``durations[c]`` virtual seconds; no new round starts at ``stop``."""

    durations: dict[str, float]
    stop: float = 15.0
    seq: dict[str, int] = field(default_factory=dict)

    def react(self, actions: list[Action]) -> list[tuple]:
        """A device answers its schedule with a promise and (later, by wall time) the update itself."""
        out: list[tuple] = []
        for a in actions:
            if isinstance(a, Schedule) and a.start_at < self.stop:
                seq = self.seq[a.client_id] = self.seq.get(a.client_id, 0) + 1
                out += [("promise", a.client_id, seq, a.version, a.start_at + self.durations[a.client_id])]
                out += [("update", a.client_id, seq)]
        return out


def feed(clock: VirtualClock, msg: tuple, wall: float) -> None:
    if msg[0] == "promise":
        _, cid, seq, base, due = msg
        assert clock.promise(cid, seq, base, due, wall) is None
    else:
        _, cid, seq = msg
        clock.arrive(cid, seq, (cid, seq), 0.0)


def run(rule: FlushRule, durations: dict[str, float], order: random.Random | None = None) -> tuple[list, Buffer]:
    """Drive a fleet to its stop time; ``order`` shuffles which messages reach the server first."""
    clock: VirtualClock[tuple[str, int]] = VirtualClock(rule)
    fleet, sink = Fleet(durations), Buffer()
    for cid in sorted(durations):  # registration is wall-clock: every device says hello before the run
        clock.hello(cid, 0.0)
    decisions = clock.advance(0.0, sink)
    inbox = fleet.react(decisions)
    while inbox:
        if order is None:
            batch, inbox = inbox, []
        else:
            order.shuffle(inbox)
            k = order.randint(1, len(inbox))
            batch, inbox = inbox[:k], inbox[k:]
        for msg in batch:
            feed(clock, msg, 0.0)
        actions = clock.advance(0.0, sink)
        decisions += actions
        inbox += fleet.react(actions)
    return decisions, sink


SPEEDS = {"a": 3.0, "b": 5.0, "c": 7.0}


def schedules(decisions: list) -> list[tuple[str, float, int]]:
    return [(d.client_id, d.start_at, d.version) for d in decisions if isinstance(d, Schedule)]


def test_async_processes_by_virtual_time_flushes_every_k_and_keeps_fast_devices_busy() -> None:
    decisions, sink = run(FlushRule("async", buffer_size=2, window=100.0), SPEEDS)
    processed = [(d.client_id, d.time) for d in decisions if isinstance(d, Processed)]
    assert processed == [("a", 3), ("b", 5), ("a", 6), ("c", 7), ("a", 9), ("b", 10), ("a", 12), ("c", 14)] + [
        ("a", 15),
        ("b", 15),  # a tie: by client id
    ]
    assert [(d.time, d.version) for d in decisions if isinstance(d, Flushed)] == [
        (5, 1),
        (7, 2),
        (10, 3),
        (14, 4),
        (15, 5),
    ]
    assert ["".join(c for c, _, _ in b) for _, b in sink.flushes] == ["ab", "ac", "ab", "ac", "ab"]
    assert schedules(decisions) == [
        ("a", 0, 0),
        ("b", 0, 0),
        ("c", 0, 0),
        ("a", 3, 0),  # delivered at 3 and starts again at once, from the version current at 3
        ("b", 5, 1),  # its own update made version 1 at 5
        ("a", 6, 1),
        ("c", 7, 2),
        ("a", 9, 2),
        ("b", 10, 3),
        ("a", 12, 3),
        ("c", 14, 4),
        ("a", 15, 5),  # both at 15 start from the version made by the second one at 15
        ("b", 15, 5),
    ]
    assert not sink.discarded


def test_async_window_flushes_at_its_virtual_expiry() -> None:
    decisions, sink = run(FlushRule("async", buffer_size=10, window=4.0), {"a": 3.0, "b": 5.0, "c": 7.0})
    flushes = [(d.time, d.updates) for d in decisions if isinstance(d, Flushed)]
    # a@3 opens the window: it closes at 3 + 4 = 7 with b@5, a@6 and c@7 (an update at 7 comes before the timer)
    assert flushes == [(7.0, 4), (13.0, 3)]  # a@9 opens the next one: b@10, a@12; then a, b stop at 15
    assert ("a", 6.0, 0) in schedules(decisions) and ("c", 7.0, 1) in schedules(decisions)


def test_a_rounds_per_version_cap_makes_a_fast_device_wait_for_the_next_flush() -> None:
    fast = {"a": 1.0, "b": 5.0, "c": 7.0}
    _, free = run(FlushRule("async", buffer_size=3, window=100.0), fast)
    assert ["".join(c for c, _, _ in b) for _, b in free.flushes][:2] == ["aaa", "aab"]  # a fills flushes alone
    decisions, capped = run(FlushRule("async", buffer_size=3, window=100.0, rounds_per_version=1), fast)
    assert [(t, "".join(c for c, _, _ in b)) for t, b in capped.flushes] == [(7, "abc"), (14, "abc"), (21, "abc")]
    assert schedules(decisions) == [
        ("a", 0, 0),
        ("b", 0, 0),
        ("c", 0, 0),
        ("a", 7, 1),  # delivered at 1 from version 0, then waited for the flush that made version 1
        ("b", 7, 1),
        ("c", 7, 1),  # its own update made the flush: it starts again at once
        ("a", 14, 2),
        ("b", 14, 2),
        ("c", 14, 2),
        ("a", 21, 3),
        ("b", 21, 3),
        ("c", 21, 3),
    ]
    _, twice = run(FlushRule("async", buffer_size=3, window=100.0, rounds_per_version=2), fast)
    assert "".join(c for c, _, _ in twice.flushes[0][1]) == "aab"  # two rounds of a's from version 0, then b's


def test_a_per_flush_cap_keeps_a_devices_older_and_current_update_out_of_one_buffer() -> None:
    speeds = {"a": 1.5, "b": 2.0, "c": 4.0}

    def flushes(**cap: int) -> list[tuple[float, str]]:
        _, sink = run(FlushRule("async", buffer_size=2, window=100.0, **cap), speeds)
        return [(t, "".join(c for c, _, _ in b)) for t, b in sink.flushes]

    by_version = flushes(rounds_per_version=1)
    # a's update from version 4 lands after version 5 is made: it does not count, a trains again from version 5
    assert (10.0, "aa") in by_version
    by_flush = flushes(updates_per_flush=1)
    assert all(len(set(names)) == len(names) for _, names in by_flush)  # one update per device in any flush
    assert by_flush[:3] == [(2.0, "ab"), (4.0, "ab"), (5.5, "ca")]


def test_a_capped_fleet_that_all_waits_flushes_at_once_instead_of_at_the_window() -> None:
    decisions, sink = run(FlushRule("async", buffer_size=5, window=100.0, rounds_per_version=1), SPEEDS)
    assert [(d.time, d.updates) for d in decisions if isinstance(d, Flushed)][0] == (7.0, 3)  # not at 3 + 100
    assert ("a", 7.0, 1) in schedules(decisions)


def test_sync_rounds_wait_for_everyone_or_the_deadline_and_a_straggler_counts_next_round() -> None:
    decisions, sink = run(FlushRule("sync", round_deadline=6.0), SPEEDS)
    flushes = [(d.time, d.version, d.updates) for d in decisions if isinstance(d, Flushed)]
    assert flushes[:2] == [(6.0, 1, 2), (11.0, 2, 3)]
    assert [(c, s, t) for c, s, t in sink.flushes[1][1]] == [("c", 1, 7.0), ("a", 2, 9.0), ("b", 2, 11.0)]
    assert schedules(decisions)[:8] == [
        ("a", 0, 0),
        ("b", 0, 0),
        ("c", 0, 0),
        ("a", 6, 1),  # the round's devices wait for its flush at the deadline
        ("b", 6, 1),
        ("c", 7, 1),  # the straggler restarts at its arrival, from the version current then
        ("a", 11, 2),  # a and b were the round: a waited for b
        ("b", 11, 2),
    ]


def test_sync_without_deadline_is_lockstep() -> None:
    decisions, _ = run(FlushRule("sync"), SPEEDS)
    flushes = [(d.time, d.version, d.updates) for d in decisions if isinstance(d, Flushed)]
    assert flushes == [(7.0, 1, 3), (14.0, 2, 3), (21.0, 3, 3)]
    assert schedules(decisions)[3:6] == [("a", 7, 1), ("b", 7, 1), ("c", 7, 1)]


@pytest.mark.parametrize("rule", [FlushRule("async", 2, 4.0), FlushRule("sync", round_deadline=6.0), FlushRule("sync")])
def test_decisions_do_not_depend_on_the_order_messages_arrive_in(rule: FlushRule) -> None:
    speeds = {"a": 3.0, "b": 5.0, "c": 7.0, "d": 5.0, "e": 2.5}
    reference, ref_sink = run(rule, speeds)
    for seed in range(12):
        decisions, sink = run(rule, speeds, random.Random(seed))
        assert decisions == reference, f"seed {seed}"
        assert sink.flushes == ref_sink.flushes
        assert sink.seen == decisions  # the sink heard every decision, in order


def test_an_update_waits_for_devices_that_could_still_deliver_earlier() -> None:
    clock: VirtualClock[str] = VirtualClock(FlushRule("async", buffer_size=1))
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.hello("b", 0.0)
    clock.advance(0.0, sink)
    clock.promise("a", 1, 0, 9.0, 0.0)
    clock.arrive("a", 1, ("a", 1), 0.0)
    assert clock.advance(0.0, sink) == [] and clock.blocked_on() == "a promise from b (scheduled at 0.0)"
    clock.promise("b", 1, 0, 4.0, 0.0)
    assert clock.advance(0.0, sink) == [] and clock.blocked_on() == "the update of b due at 4.0"
    clock.arrive("b", 1, ("b", 1), 0.0)
    assert [type(d).__name__ for d in clock.advance(0.0, sink)] == ["Processed", "Flushed", "Schedule"]
    assert [b[0][:2] for _, b in sink.flushes] == [("b", 1)]


def test_a_dropped_promise_frees_the_clock_and_a_new_hello_reschedules() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("sync"), timeout=10.0)
    sink = Buffer()
    for cid in ("a", "b"):
        clock.hello(cid, 0.0)
    clock.advance(0.0, sink)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.arrive("a", 1, ("a", 1), 0.0)
    clock.promise("b", 1, 0, 5.0, 1.0)  # b is killed: its update never comes
    assert [type(d) for d in clock.advance(5.0, sink)] == [Processed]  # a waits for the round
    assert clock.advance(15.0, sink) == []
    decisions = clock.advance(15.5, sink)  # 10.5 wall seconds of silence since a's update was processed
    assert decisions == [
        Dropped("b", 1, "no update 1 within 10 s of its promise"),
        Flushed(3.0, 1, 1),  # the round no longer waits for b
        Schedule("a", 3.0, 1),
    ]
    assert clock.dropped == 1
    clock.hello("b", 16.0)  # b restarted: a new round just after now (it may have acted on one at (3.0, 1))
    assert clock.advance(16.0, sink) == [Schedule("b", math.nextafter(3.0, math.inf), 1)]
    clock.arrive("b", 1, ("b", 1), 0.0)  # its old update from an outbox: held (an update may overtake its promise)
    clock.promise("b", 2, 1, 6.0, 16.0)  # ... until its next promise shows no promise will claim it
    clock.arrive("b", 2, ("b", 2), 0.0)
    assert clock.advance(16.0, sink) == []  # a (scheduled at 3) could still deliver before 6
    clock.promise("a", 2, 1, 10.0, 16.0)
    clock.arrive("a", 2, ("a", 2), 0.0)
    assert clock.advance(16.0, sink) == [  # b rejoined at 3, the start of the round: the round waits for it
        Processed("b", 2, 6.0),
        Processed("a", 2, 10.0),
        Flushed(10.0, 2, 2),
        Schedule("a", 10.0, 2),
        Schedule("b", 10.0, 2),
    ]
    assert sink.discarded == [("b", 1)]


def test_a_device_that_said_hello_while_promised_is_rescheduled_when_its_promise_drops() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1), timeout=10.0)
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.advance(0.0, sink)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.hello("a", 1.0)  # restarted mid-round
    assert clock.advance(1.0, sink) == []
    assert clock.advance(10.5, sink) == []  # its hello at wall 1 was activity: 9.5 s of silence
    assert clock.advance(11.5, sink) == [Dropped("a", 1, "no update 1 within 10 s of its promise"), Schedule("a", 0, 0)]


def test_nobody_is_dropped_while_the_fleet_is_busy() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1), timeout=10.0)
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.hello("b", 0.0)
    clock.advance(0.0, sink)
    clock.promise("b", 1, 0, 100.0, 0.0)  # b trains slowly on the wall clock (a busy host)
    for seq in range(1, 7):  # a keeps delivering every 5 wall seconds
        wall = 5.0 * seq
        clock.promise("a", seq, seq - 1, 3.0 * seq, wall)
        clock.arrive("a", seq, ("a", seq), wall)
        assert not [d for d in clock.advance(wall, sink) if isinstance(d, Dropped)]
    assert clock.advance(40.0, sink) == []  # 10 s of silence since wall 30 is not more than the timeout
    dropped = [(d.client_id, d.seq) for d in clock.advance(40.5, sink) if isinstance(d, Dropped)]
    assert dropped == [("a", None), ("b", 1)]  # then every device the fleet waits for goes


def test_with_a_fleet_size_nothing_is_processed_before_the_whole_fleet_said_hello() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1), fleet=2, timeout=10.0)
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.arrive("a", 1, ("a", 1), 0.0)
    assert clock.advance(100.0, sink) == [Schedule("a", 0.0, 0)]  # no processing, no timeout either
    clock.hello("b", 100.0)  # the slow process: still scheduled at 0, like a
    clock.promise("b", 1, 0, 5.0, 100.0)
    assert clock.advance(100.0, sink)[:3] == [Schedule("b", 0.0, 0), Processed("a", 1, 3.0), Flushed(3.0, 1, 1)]


def test_an_unanswered_schedule_drops_the_device() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1), timeout=10.0)
    clock.hello("a", 0.0)
    clock.advance(0.0, Buffer())
    assert clock.advance(20.0, Buffer()) == [Dropped("a", None, "no promise within 10 s of its schedule")]


def test_bad_promises_are_ignored_or_adjusted_with_one_line() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1))
    assert "no schedule outstanding" in clock.promise("x", 1, 0, 3.0, 0.0)
    clock.hello("a", 0.0)
    problem = clock.promise("a", 1, 0, 0.0, 0.0)
    assert problem is not None and "not after its start" in problem
    assert clock.clients["a"].due > 0.0
    assert clock.promise("a", 1, 0, 0.0, 0.0) is None  # the same promise delivered again


def test_flush_rules() -> None:
    rule = FlushRule("async", buffer_size=2, window=4.0)
    assert rule.buffer_due(2, 10.0, 10.0) and rule.buffer_due(1, 10.0, 14.0) and not rule.buffer_due(1, 10.0, 13.9)
    assert rule.window_closes_at(10.0) == 14.0 and rule.window_closes_at(None) is None
    sync = FlushRule("sync", round_deadline=6.0)
    assert sync.round_due({"a", "b"}, {"a", "b"}, 2, 0.0, 3.0)
    assert not sync.round_due({"a", "b"}, {"a"}, 1, 0.0, 5.0) and sync.round_due({"a", "b"}, {"a"}, 1, 0.0, 6.0)
    assert not sync.round_due({"a"}, {"a"}, 0, 0.0, 9.0)  # nothing buffered: nothing to flush
    assert not rule.waits_for_flush(5)  # no cap by default
    capped = FlushRule("async", rounds_per_version=2)
    assert not capped.waits_for_flush(1) and capped.waits_for_flush(2)
    assert not FlushRule("sync", rounds_per_version=1).waits_for_flush(3)  # a sync round waits anyway
    per_flush = FlushRule("async", updates_per_flush=1)
    assert not per_flush.waits_for_flush(5, 0) and per_flush.waits_for_flush(0, 1)
    for bad in ({"mode": "rounds"}, {"buffer_size": 0}, {"window": 0.0}, {"round_deadline": -1.0}):
        with pytest.raises(FlushRuleError):
            FlushRule(**bad)
    with pytest.raises(FlushRuleError, match="rounds per version"):
        FlushRule(rounds_per_version=-1)
    with pytest.raises(FlushRuleError, match="updates per flush"):
        FlushRule(updates_per_flush=-1)


def test_a_refused_update_still_takes_its_turn_and_its_device_goes_on() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1))
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.hello("b", 0.0)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.promise("b", 1, 0, 5.0, 0.0)
    clock.arrive("a", 1, None, 0.0)  # the server rejected it (malformed, too stale, ...)
    clock.arrive("b", 1, ("b", 1), 0.0)
    assert clock.advance(0.0, sink)[2:] == [Processed("a", 1, 3.0), Schedule("a", 3.0, 0)]  # no flush
    assert not sink.flushes


@pytest.mark.parametrize("b_refused", [False, True])
def test_sync_round_counts_a_refused_update_as_delivered(b_refused: bool) -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("sync"))
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.hello("b", 0.0)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.promise("b", 1, 0, 5.0, 0.0)
    clock.arrive("a", 1, None, 0.0)
    clock.arrive("b", 1, None if b_refused else ("b", 1), 0.0)
    decisions = clock.advance(0.0, sink)[2:]
    flush = [] if b_refused else [Flushed(5.0, 1, 1)]  # nothing to flush: the round still ends at 5
    version = 0 if b_refused else 1
    assert decisions == [
        Processed("a", 1, 3.0),
        Processed("b", 1, 5.0),
        *flush,
        Schedule("a", 5.0, version),
        Schedule("b", 5.0, version),
    ]


def test_a_restarted_servers_clock_reschedules_just_after_now_and_counts_restored_updates() -> None:
    """The old process scheduled a and b at (3.0, 1) and took (then lost, with its death) their promises; c's
    update was stored before the crash. The new clock must not send (3.0, 1) again: a device never runs a
    schedule it acted on twice, so it would wait for ever."""
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 2), version=1, now=3.0, timeout=10.0)
    sink = Buffer(version=1)
    clock.resume(["a", "b", "c"], {"c": 4.0}, [4.0], 0.0)
    after = math.nextafter(3.0, math.inf)
    assert clock.advance(0.0, sink) == [Schedule("a", after, 1), Schedule("b", after, 1)]
    clock.promise("a", 2, 1, 5.0, 1.0)  # a trains its new round (its update 1 from the old one is let go)
    clock.arrive("a", 2, ("a", 2), 1.0)
    clock.promise("b", 2, 1, 9.0, 1.0)
    assert clock.advance(1.0, sink) == [Schedule("c", 4.0, 1)]  # c waits for its restored update's time
    assert clock.blocked_on() == "a promise from c (scheduled at 4.0)"
    clock.promise("c", 7, 1, 7.0, 2.0)
    assert clock.advance(2.0, sink) == [  # a's update and c's restored one make K = 2
        Processed("a", 2, 5.0),
        Flushed(5.0, 2, 2),
        Schedule("a", 5.0, 2),
    ]


def test_a_sync_restart_waits_for_the_restored_round() -> None:
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("sync"), version=2, now=6.0)
    sink = Buffer(version=2)
    clock.resume(["a", "b"], {"b": 8.0}, [8.0], 0.0)  # b delivered in this round before the crash
    assert clock.advance(0.0, sink) == [Schedule("a", math.nextafter(6.0, math.inf), 2)]
    clock.promise("a", 5, 2, 9.0, 0.0)
    clock.arrive("a", 5, ("a", 5), 0.0)
    assert clock.advance(0.0, sink) == [
        Processed("a", 5, 9.0),
        Flushed(9.0, 3, 2),  # b's restored update and a's
        Schedule("a", 9.0, 3),
        Schedule("b", 9.0, 3),
    ]


@pytest.mark.parametrize("late", [("b", 1), None])
def test_a_dropped_devices_late_update_brings_it_back(late: tuple[str, int] | None) -> None:
    """A broker restart lost b's update; the device sends it again after its ack timeout, long after the clock
    dropped it. Accepted (``late``) or refused (None), the update shows b is alive: it gets a new round."""
    clock: VirtualClock[tuple[str, int]] = VirtualClock(FlushRule("async", 1), timeout=10.0)
    sink = Buffer()
    clock.hello("a", 0.0)
    clock.hello("b", 0.0)
    clock.advance(0.0, sink)
    clock.promise("b", 1, 0, 2.0, 0.0)
    clock.promise("a", 1, 0, 3.0, 0.0)
    clock.arrive("a", 1, ("a", 1), 0.0)
    assert clock.advance(11.0, sink)[:1] == [Dropped("b", 1, "no update 1 within 10 s of its promise")]
    clock.arrive("b", 1, late, 60.0)
    assert clock.advance(60.0, sink) == [Schedule("b", math.nextafter(3.0, math.inf), 1)]
    clock.promise("b", 2, 1, 4.0, 61.0)  # its new round: the late update is let go
    clock.arrive("b", 2, ("b", 2), 61.0)
    clock.promise("a", 2, 1, 6.0, 61.0)
    assert Processed("b", 2, 4.0) in clock.advance(61.0, sink)
    assert sink.discarded == ([] if late is None else [("b", 1)])
