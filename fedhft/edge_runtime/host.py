"""`fedhft edge host`: many devices in one process over shared training runtimes.

Each hosted device is a whole `fedhft edge run` client -- its own identity, state directory, outbox and MQTT
session -- but all of them are driven through the client loop's steps on one thread, and devices of the same
package share one loaded trainer (shared_trainer.py). One pass: every device takes its events; under virtual
time every due round is promised (so the server's clock never waits on the host's queue); then one device,
in turn, trains its due round. What a device computes does not depend on the host: the same seeds give the
same updates, and the server orders them by the devices' virtual clocks.
The devices come from a devices file (device_file.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedhft.edge_runtime.client import EdgeClient
from fedhft.edge_runtime.client_config import ClientConfig, ClientError, ClientSummary
from fedhft.edge_runtime.shared_trainer import SharedTrainers
from fedhft.errors import FedHFTError
from fedhft.logs import event

log = logging.getLogger("fedhft.edge_runtime.host")
IDLE_SLEEP = 0.02  # seconds a pass with nothing to train waits before the next


@dataclass
class HostResult:
    """What each hosted device did, and the devices that stopped on an error (client id -> reason)."""

    summaries: dict[str, ClientSummary] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # updates left in each device's outbox
    failed: dict[str, str] = field(default_factory=dict)


def run_host(
    configs: Sequence[ClientConfig],
    stop: threading.Event | None = None,
    status: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> HostResult:
    """Run every device until each is done (as `fedhft edge run` would end), ``stop`` is set or ``timeout``
    seconds pass. ``status`` gets each device's connection lines, prefixed with its id."""
    ids = [c.client_id for c in configs]
    if len(set(ids)) != len(ids):
        raise ClientError(f"a host runs each client id once: {sorted({i for i in ids if ids.count(i) > 1})}")
    stop = stop or threading.Event()
    say = status or (lambda line: event(log, line))
    deadline = None if timeout is None else time.monotonic() + timeout
    pool, result, clients = SharedTrainers(), HostResult(), []
    try:
        for cfg in configs:
            trainer = pool.trainer_for(
                cfg.artifacts, cfg.backend, cfg.learning_rate, trainer_timeout=cfg.trainer_timeout
            )
            client = EdgeClient(cfg, trainer=trainer, status=lambda line, cid=cfg.client_id: say(f"{cid}: {line}"))
            clients.append(client)
            client.open(stop)
        event(log, "hosting devices", devices=len(clients), runtimes=len(pool.runtimes))
        active, turn = list(clients), 0
        while active and not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            trained = False
            for client in active:
                _step(client, result, lambda c: (c.pump(), c.promise_due()))
            for i in range(len(active)):  # one round a pass, the devices in turn
                client = active[(turn + i) % len(active)]
                if client.cfg.client_id not in result.failed and client.due_round() is not None:
                    turn = (turn + i + 1) % len(active)
                    trained = _step(client, result, EdgeClient.train_due)
                    break
            for client in [c for c in active if c.finished() or c.cfg.client_id in result.failed]:
                active.remove(client)
                _close(client, result)  # as `fedhft edge run` exits: disconnected, state saved
            if not trained:
                time.sleep(IDLE_SLEEP)
    finally:
        for client in clients:
            _close(client, result)
        pool.close()
    return result


def _step(client: EdgeClient, result: HostResult, step: Callable[[EdgeClient], object]) -> bool:
    """Run one step of one device; a device that fails stops alone (noted in ``result``), the host goes on."""
    try:
        step(client)
        return True
    except FedHFTError as e:
        result.failed[client.cfg.client_id] = str(e)
        event(log, "a hosted device stopped on an error", logging.ERROR, client=client.cfg.client_id, error=str(e))
        return False


def _close(client: EdgeClient, result: HostResult) -> None:
    if client.cfg.client_id in result.summaries:
        return
    try:
        client.close()
    except FedHFTError as e:
        result.failed.setdefault(client.cfg.client_id, str(e))
    result.summaries[client.cfg.client_id] = client.summary
    result.queued[client.cfg.client_id] = len(client.outbox)
