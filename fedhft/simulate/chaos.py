"""Chaos mode for `fedhft simulate --chaos SPEC`: faults injected on a seeded schedule, and what they cost.

SPEC is ``KIND=COUNT,...`` (or ``default``) over the kinds:

    edge-kill       kill -9 of a random running edge runtime, restarted after ``restart_delay`` seconds
    server-kill     kill -9 of the server, restarted after ``restart_delay`` seconds (same state dir)
    broker-restart  the broker stops and starts again on the same port (its persistence file keeps sessions)
    drop            a random edge's connection is cut: another client takes over its MQTT session (clean_start
                    false, so the session survives) and leaves; the edge reconnects on its own
    duplicate       a captured update is published a second time (the server must not aggregate it twice)
    delay           a captured update or client model is published again 5-20 s later (a late duplicate, or
                    a replayed older model the device must refuse)

Faults land at seeded times spread over ``window`` wall-clock seconds, counted from when every process of the
fleet has been started. The accounting compares what the edges
produced (updates seen on the wire), what the server acknowledged (acks seen on the wire) and what its state
holds at the end (:func:`state_accounting`): an acknowledged update missing from the state is lost.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol.mqtt import make_client, parse_broker_url, session_properties
from fedhft.protocol.topics import PREFIX
from fedhft.simulate.traffic import connect_observer

log = logging.getLogger("fedhft.simulate.chaos")

KINDS = ("edge-kill", "server-kill", "broker-restart", "drop", "duplicate", "delay")
RETRIES, RETRY_SECONDS = 12, 10.0  # a fault with no target yet waits for one, up to two minutes
DEFAULT = {"edge-kill": 2, "server-kill": 1, "broker-restart": 1, "drop": 2, "duplicate": 2, "delay": 2}


class ChaosError(FedHFTError):
    """A bad --chaos spec."""


@dataclass(frozen=True)
class ChaosSpec:
    counts: dict[str, int]
    window: float = 90.0  # wall-clock seconds over which faults are spread
    start: float = 10.0  # no fault before this (the fleet is still starting)
    restart_delay: float = 3.0

    @classmethod
    def parse(cls, text: str) -> ChaosSpec:
        """``default`` or ``edge-kill=2,server-kill=1,...`` (plus ``window=S``, ``start=S``, ``restart-delay=S``)."""
        counts: dict[str, int] = {}
        opts: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if part == "default":
                counts.update(DEFAULT)
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ChaosError(f"--chaos: '{part}' is not KIND=COUNT")
            try:
                number = float(value)
            except ValueError as e:
                raise ChaosError(f"--chaos: '{part}' needs a number") from e
            if key in KINDS:
                if number < 0 or number != int(number):
                    raise ChaosError(f"--chaos: count of {key} must be a whole number >= 0")
                counts[key] = int(number)
            elif key in ("window", "start", "restart-delay"):
                if number <= 0:
                    raise ChaosError(f"--chaos: {key} must be > 0")
                opts[key.replace("-", "_")] = number
            else:
                raise ChaosError(f"--chaos: unknown fault '{key}'; choose from {', '.join(KINDS)}")
        if not counts:
            raise ChaosError("--chaos is empty")
        return cls(counts, **opts)


@dataclass(frozen=True, order=True)
class Fault:
    at: float  # seconds after the fleet started
    kind: str
    tries: int = field(default=0, compare=False)  # times it found no target yet


def schedule(spec: ChaosSpec, seed: int) -> list[Fault]:
    """The faults in time order: each at a seeded uniform time in [start, start + window]."""
    rng = random.Random(seed)
    faults = [
        Fault(round(spec.start + rng.uniform(0, spec.window), 3), kind)
        for kind in KINDS
        for _ in range(spec.counts.get(kind, 0))
    ]
    return sorted(faults)


@dataclass
class Injector:
    """An MQTT client that captures updates and client models, and republishes them (duplicate, delay)."""

    broker: str
    task: str
    seed: int
    captured: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timers: list[threading.Timer] = field(default_factory=list)

    def start(self) -> Injector:
        self.rng = random.Random(self.seed + 1)
        self._client = connect_observer(
            self.broker,
            f"fedhft-chaos-{self.task}",
            [(f"{PREFIX}/{self.task}/update/+", 1), (f"{PREFIX}/{self.task}/model/client/+", 1)],
            self._on_message,
        )
        return self

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.captured.append((msg.topic, bytes(msg.payload)))
            del self.captured[:-200]

    def _pick(self, kinds: tuple[str, ...]) -> tuple[str, bytes] | None:
        with self._lock:
            pool = [(t, p) for t, p in self.captured if any(f"/{k}/" in t for k in kinds)]
        return self.rng.choice(pool) if pool else None

    def duplicate(self) -> str | None:
        found = self._pick(("update",))
        if found is None:
            return None
        self._client.publish(found[0], found[1], qos=1)
        return found[0]

    def delay(self) -> str | None:
        found = self._pick(("update", "model/client") if self.rng.random() < 0.5 else ("model/client", "update"))
        if found is None:
            return None
        timer = threading.Timer(self.rng.uniform(5, 20), self._client.publish, (found[0], found[1], 1))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return found[0]

    def drop(self, mqtt_client_id: str) -> bool:
        """Cut ``mqtt_client_id``'s connection by taking over its session (kept) and leaving at once."""
        addr = parse_broker_url(self.broker)
        c = make_client(mqtt_client_id)
        try:
            c.connect(addr.host, addr.port, clean_start=False, properties=session_properties(3600))
            c.loop_start()
            deadline = time.monotonic() + 5
            while not c.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            ok = c.is_connected()
            c.disconnect()
            c.loop_stop()
            return ok
        except OSError:
            return False

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self._client.loop_stop()
        self._client.disconnect()


@dataclass
class Chaos:
    """Runs the schedule: ``tick()`` from the simulation loop injects every fault that is due."""

    spec: ChaosSpec
    seed: int
    injector: Injector
    kill_edge: Callable[[random.Random], str | None]
    kill_server: Callable[[], bool]
    restart_broker: Callable[[], bool]
    drop_target: Callable[[random.Random], str | None]  # an MQTT client id of a running edge
    injected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.faults = schedule(self.spec, self.seed)
        self.rng = random.Random(self.seed + 2)

    def tick(self, elapsed: float) -> None:
        """Inject every due fault; one without a target yet (no update captured, no edge running) is retried
        every RETRY_SECONDS, up to RETRIES times, before it counts as skipped."""
        while self.faults and self.faults[0].at <= elapsed:
            fault = self.faults.pop(0)
            target = self._inject(fault.kind)
            if not target and fault.tries < RETRIES:
                self.faults = sorted(
                    [*self.faults, Fault(round(elapsed + RETRY_SECONDS, 3), fault.kind, fault.tries + 1)]
                )
                continue
            (self.injected if target else self.skipped)[fault.kind] += 1
            self.log.append({"at": round(elapsed, 1), "kind": fault.kind, "target": target or None})
            event(log, "fault injected" if target else "fault skipped", kind=fault.kind, target=target)

    def _inject(self, kind: str) -> str | None:
        if kind == "edge-kill":
            return self.kill_edge(self.rng)
        if kind == "server-kill":
            return "server" if self.kill_server() else None
        if kind == "broker-restart":
            return "broker" if self.restart_broker() else None
        if kind == "drop":
            target = self.drop_target(self.rng)
            return target if target and self.injector.drop(target) else None
        if kind == "duplicate":
            return self.injector.duplicate()
        return self.injector.delay()

    def pending(self) -> int:
        return len(self.faults)


def state_accounting(state_db: Path, produced: set[tuple[str, int]], acked: set[tuple[str, int]]) -> dict:
    """Compare what the edges produced and the server acknowledged with what the server's state holds."""
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT client_id, seq, status, reason FROM updates").fetchall()
        versions, contributions = db.execute("SELECT COUNT(*), COALESCE(SUM(num_updates), 0) FROM versions").fetchone()
    finally:
        db.close()
    status = {(c, int(s)): (st, reason) for c, s, st, reason in rows}
    aggregated = {k for k, (st, _) in status.items() if st == "aggregated"}
    pending = {k for k, (st, _) in status.items() if st == "pending"}
    dropped = Counter(reason.split(":")[0] for st, reason in status.values() if st == "rejected")
    lost = sorted(k for k in acked if k not in aggregated and k not in pending and status.get(k, ("", ""))[0] == "")
    return {
        "updates_produced": len(produced),
        "acknowledged": len(acked),
        "aggregated": len(aggregated),
        "pending_at_end": len(pending),
        "dropped_by_server": dict(dropped),
        "acknowledged_but_lost": len(lost),
        "lost_examples": [f"{c}/{s}" for c, s in lost[:10]],
        # every version records how many updates it took in: more than the distinct updates marked aggregated
        # means one (client, seq) went into the model twice (also: two rows of one (client, seq))
        "duplicates_aggregated": max(0, int(contributions) - len(aggregated)) + (len(rows) - len(status)),
        "versions": int(versions),
    }
