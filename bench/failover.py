"""Aggregator failover: seconds from a kill -9 of the aggregating server to a standby serving and to the first
new model version it publishes, with every acknowledged update kept and none aggregated twice.

Each trial starts a fresh Mosquitto (127.0.0.1, a free port) and a fresh PostgreSQL database, then four `fedhft
server run` children on it: two `--role ingest`, a leader `--role aggregator` and a `--standby` aggregator.
Devices (the phone-midrange-6gb plan on MiniLM shapes, fp16 updates, one identity each) send rounds of one update
each, paced by the acks; every K stored updates make a version. Right after round `--kill-round` is sent (its
updates are being stored, and the leader, which has made at least two versions, is flushing) the leader is
killed with SIGKILL, and the remaining rounds are sent at once; the trial ends when the standby has aggregated
all but fewer than K updates. Measured per
trial: seconds from the kill to the standby's `fedhft_ready`, and to the first model above the last committed
version arriving at a subscriber; acknowledged updates not stored (lost); updates counted in two versions
(doubled); whether every model topic's versions only grew. Writes bench/results/failover.json and prints a table.

Run: `.venv/bin/python bench/failover.py [--trials 5] [--devices 6] [--buffer-size 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (throwaway database, server children), bench helpers

from bench.loadgen import load_average  # noqa: E402
from bench.server_ingest import PROFILE, bench_manifest  # noqa: E402
from fedhft.broker_server.broker.embedded import EmbeddedBroker  # noqa: E402
from fedhft.protocol import decode_model, encode_update  # noqa: E402
from fedhft.simulate.load_plan import random_update_tensors  # noqa: E402
from tests.support.mosquitto import free_port  # noqa: E402
from tests.support.postgres import fresh_database  # noqa: E402
from tests.support.server import Hub, ServerProcess, db_rows, update_message, wait_until  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TASK = "failover"


def record_model_arrivals(hub: Hub) -> list[tuple[float, str, bytes]]:
    """(monotonic time, topic, payload) of every model the hub receives from now on, beside its own records."""
    arrivals: list[tuple[float, str, bytes]] = []
    handle = hub.client.on_message

    def on_message(client: object, userdata: object, msg: object) -> None:
        if "/model/" in msg.topic:  # type: ignore[attr-defined]
            arrivals.append((time.monotonic(), msg.topic, bytes(msg.payload)))  # type: ignore[attr-defined]
        handle(client, userdata, msg)

    hub.client.on_message = on_message
    return arrivals


def first_version_after(arrivals: list[tuple[float, str, bytes]], since: float, above: int) -> float | None:
    """Monotonic time of the first model received after ``since`` whose version is above ``above``."""
    for t, _topic, payload in sorted(arrivals[:]):
        if t >= since and decode_model(payload).version > above:
            return t
    return None


def audit(url: str, acked: set[tuple[str, int]], arrivals: list[tuple[float, str, bytes]]) -> dict:
    """Lost, doubled and version order from the database and the models received."""
    rows = {
        (c, s): (st, v)
        for c, s, st, v in db_rows(url, "SELECT client_id, seq, status, aggregated_version FROM updates")
    }
    versions = dict(db_rows(url, "SELECT version, num_updates FROM versions"))
    aggregated = [v for st, v in rows.values() if st == "aggregated"]
    per_version = {v: aggregated.count(v) for v in set(aggregated)}
    by_topic: dict[str, list[int]] = {}
    for _t, topic, payload in sorted(arrivals):
        by_topic.setdefault(topic, []).append(decode_model(payload).version)
    return {
        "acked": len(acked),
        "stored": len(rows),
        "lost": sum(1 for k in acked if k not in rows or rows[k][0] not in ("aggregated", "pending")),
        "doubled": sum(abs(per_version.get(v, 0) - n) for v, n in versions.items()),
        "versions": len(versions),
        "versions_only_grew": all(seen == sorted(seen) for seen in by_topic.values()),
    }


def trial(args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    mdir, plan, spec, cplan = bench_manifest(workdir)
    rng = np.random.default_rng(seed)
    devices = [f"dev{i:03d}" for i in range(args.devices)]
    payloads = {
        (cid, seq): encode_update(
            update_message(TASK, cid, seq, random_update_tensors(rng, spec, cplan), profile=PROFILE), "fp16"
        )
        for seq in range(1, args.rounds + 1)
        for cid in devices
    }
    extra = ("--buffer-size", str(args.buffer_size), "--window-seconds", "600", "--max-staleness", "1000")
    servers: list[ServerProcess] = []
    with EmbeddedBroker(port=free_port(), backend="mosquitto") as broker, fresh_database() as url:

        def start(role: str, *more: str, wait_ready: bool = True) -> ServerProcess:
            keys = () if role == "ingest" else ("--key-dir", str(workdir / "keys"))
            proc = ServerProcess(broker.url, TASK, url, mdir, "--role", role, *keys, *more, log_dir=workdir)
            servers.append(proc)
            return proc.start(wait_ready=wait_ready, timeout=60)

        hub = Hub(broker.port, TASK)
        arrivals = record_model_arrivals(hub)
        try:
            leader = start("aggregator", *extra)
            standby = start("aggregator", "--standby", *extra, wait_ready=False)
            for _ in range(2):
                start("ingest")
            if not wait_until(lambda: "standby: waiting" in standby.log_text(), 60):
                raise RuntimeError(f"the standby did not start: {standby.log_text()[-2000:]}")
            for cid in devices:
                hub.hello(cid, plan, profile=PROFILE)
            topic = f"fedhft/v1/{TASK}/update/"
            pending = lambda: db_rows(url, "SELECT count(*) FROM updates WHERE status = 'pending'")[0][0]  # noqa: E731
            ready_at: list[float] = []

            def watch_standby() -> None:  # from the kill on, apart from sending the remaining rounds
                if wait_until(lambda: standby.metric("fedhft_ready") == 1.0, 120):
                    ready_at.append(time.monotonic())

            watcher = threading.Thread(target=watch_standby, daemon=True)
            killed = version_at_kill = pending_at_kill = 0
            for seq in range(1, args.rounds + 1):
                infos = [hub.client.publish(topic + cid, payloads[(cid, seq)], qos=1) for cid in devices]
                for info in infos:
                    info.wait_for_publish(60)
                if seq < args.kill_round:  # devices pace their rounds by the acks until the kill
                    done = lambda s=seq: all(hub.ack_status(c, s) == "accepted" for c in devices)  # noqa: E731
                    if not wait_until(done, 120):
                        raise RuntimeError(f"round {seq} not acknowledged")
                if seq == args.kill_round:
                    if not wait_until(lambda: (leader.metric("fedhft_model_version") or 0) >= 2, 120):
                        raise RuntimeError(f"the leader made no versions: {leader.log_text()[-2000:]}")
                    leader.kill9()
                    killed = time.monotonic()
                    watcher.start()
                    version_at_kill = max((v for (v,) in db_rows(url, "SELECT version FROM versions")), default=0)
                    pending_at_kill = pending()
            watcher.join(120)
            done_all = lambda: all(hub.ack_status(*k) == "accepted" for k in payloads)  # noqa: E731
            if not (ready_at and wait_until(done_all, 120)):
                raise RuntimeError(f"the standby did not take over: {standby.log_text()[-2000:]}")
            acked = {k for k in payloads if hub.ack_status(*k) == "accepted"}
            wait_until(lambda: first_version_after(arrivals, killed, version_at_kill) is not None, 60)
            published = first_version_after(arrivals, killed, version_at_kill)
            wait_until(lambda: pending() < args.buffer_size, 120)  # the standby aggregated the rest
        finally:
            for s in servers:
                s.stop()
            hub.close()
        row = {
            "seed": seed,
            "version_at_kill": version_at_kill,
            "pending_at_kill": pending_at_kill,
            "standby_ready_s": round(ready_at[0] - killed, 2),  # polled every 50 ms
            "first_new_version_s": None if published is None else round(published - killed, 2),
            **audit(url, acked, arrivals),
            "load_avg_1m_at_end": load_average(),
        }
    return row


def summary(rows: list[dict]) -> dict:
    def stats(key: str) -> dict:
        vals = [r[key] for r in rows if r[key] is not None]
        return {"median": median(vals), "max": max(vals), "min": min(vals)} if vals else {}

    return {
        "trials": len(rows),
        "standby_ready_s": stats("standby_ready_s"),
        "first_new_version_s": stats("first_new_version_s"),
        "lost": sum(r["lost"] for r in rows),
        "doubled": sum(r["doubled"] for r in rows),
        "versions_only_grew": all(r["versions_only_grew"] for r in rows),
    }


def table(rows: list[dict]) -> str:
    cols = ["seed", "version_at_kill", "pending_at_kill", "standby_ready_s", "first_new_version_s", "acked"]
    cols += ["lost", "doubled", "versions", "versions_only_grew", "load_avg_1m_at_end"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--kill-round", type=int, default=4)
    ap.add_argument("--buffer-size", type=int, default=4, help="updates per version (K)")
    ap.add_argument("--out", type=Path, default=RESULTS / "failover.json")
    args = ap.parse_args()
    if not 1 <= args.kill_round < args.rounds:
        ap.error("--kill-round must be below --rounds")
    rows = []
    for seed in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="fedhft-failover-") as tmp:
            rows.append(trial(args, seed, Path(tmp)))
        print(f"trial {seed}: standby ready {rows[-1]['standby_ready_s']} s, new version "
              f"{rows[-1]['first_new_version_s']} s, lost {rows[-1]['lost']}, doubled {rows[-1]['doubled']}",
              flush=True)  # fmt: skip
    result = {
        "what": "kill -9 of the aggregating leader mid-stream; a --standby aggregator takes over (PostgreSQL state)",
        "setup": {
            "servers": "2 x --role ingest, 1 x --role aggregator (leader), 1 x --role aggregator --standby",
            "broker": "mosquitto on 127.0.0.1",
            "profile": PROFILE,
            "model": "MiniLM-L6-H384 shapes; fp16 updates of the plan's exact shapes, random values",
            **{k: getattr(args, k) for k in ("devices", "rounds", "kill_round", "buffer_size")},
        },
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "summary": summary(rows),
        "rows": rows,
        "command": "python bench/failover.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
