"""Ingest throughput vs the number of ingest processes (`fedhft server run --role ingest`), against the broker's
pass-through for the same payloads, in one run.

Mosquitto on loopback (a fresh one per setup); the updates of bench/server_ingest.py (MiniLM shapes,
phone-midrange-6gb plan, fp16, stored as encoders send them), N per run from K registered clients. Each repeat
measures ingest (the N payloads as updates; rate = N / (last ack - first publish), acks counted by a child
subscriber) between two runs of the broker's pass-through for the same payloads (to a plain subscriber): the mean
of those two is that ingest run's reference, and the ratio is the median over repeats. Setups, each on a fresh state:

- sqlite / all x1: today's single process on a SQLite state dir (roles need PostgreSQL: a state dir is one
  process's);
- postgres / all x1: the single process on PostgreSQL;
- postgres / ingest x1, x2, x4: that many ingest processes sharing the subscription, no aggregator running
  (ingest acks without one; in a deployment it runs elsewhere);
- postgres / ingest x2 + aggregator: the aggregator on this host too, taking every stored update from the
  database (aggregation itself held off, as for the single process).

Server CPU ms per update sums every server process of the setup; database CPU ms per update sums the
PostgreSQL backends serving them (this host's server, read from /proc). The host's 1-minute load average is
recorded beside each figure: the host may be shared (cores: os.cpu_count()). On a host whose cores every process
shares (as this one's 2), the rates follow the CPU each message costs: ``cpu_ratio`` is the CPU of one message
passed through (publisher, broker, subscriber) over the CPU of one update ingested (the same, plus the servers and
their database backends), the ratio the work alone allows whatever the load. Last, the database side alone: 1, 2
and 4 processes storing the same payloads as ingest processes do (PgStateStore shared: the registry read and one
commit per batch of 16), without MQTT or validation, to show whether the database limits ingest. Writes
bench/results/ingest_scaling.json and prints a table. Run: `nice -n 10 .venv/bin/python bench/ingest_scaling.py
[--quick]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (the throwaway database), bench helpers, this checkout's fedhft

from bench.server_ingest import (  # noqa: E402
    PROFILE,
    TASK,
    bench_manifest,
    cpu_seconds,
    finish,
    finish_counted,
    publish_all,
    publisher,
    say_hello,
    scrape,
    start_counter,
    start_server,
    table,
    update_payloads,
)
from fedhft.broker_server.broker.embedded import EmbeddedBroker  # noqa: E402
from fedhft.procs import stop_process  # noqa: E402
from fedhft.simulate.load_plan import random_update_tensors  # noqa: E402
from tests.support.postgres import fresh_database  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ACCEPTED = 'fedhft_updates_total{reason="",status="accepted"}'
HELLOS = 'fedhft_hellos_total{reason="",status="accepted"}'


@dataclass(frozen=True)
class Setup:
    backend: str  # sqlite | postgres
    role: str  # all | ingest
    processes: int
    aggregator: bool = False

    @property
    def label(self) -> str:
        return f"{self.backend} / {self.role} x{self.processes}" + (" + aggregator" if self.aggregator else "")


SETUPS = (
    Setup("sqlite", "all", 1),
    Setup("postgres", "all", 1),
    Setup("postgres", "ingest", 1),
    Setup("postgres", "ingest", 2),
    Setup("postgres", "ingest", 4),
    Setup("postgres", "ingest", 2, aggregator=True),
)


def wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not check():  # type: ignore[operator]
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure_setup(setup: Setup, work: Path, mdir: Path, plan: dict, pool: list, n: int, repeats: int) -> dict:
    """On a fresh broker (no session of an earlier setup's server left in it) and a fresh state: start the
    setup's processes, register the clients, warm up, then ``repeats`` x (pass-through, ingest) of ``n`` updates."""
    with EmbeddedBroker(port=0) as broker:
        return {**measure_on(setup, broker, work, mdir, plan, pool, n, repeats), "broker": broker.chosen}


def backend_pids(url: str) -> list[int]:
    """The PostgreSQL backends connected to ``url``'s database (the servers'), this connection's excepted."""
    import psycopg

    sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with psycopg.connect(url, autocommit=True) as db:
        return [int(r[0]) for r in db.execute(sql).fetchall()]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:  # a backend that ended
            pass
    return total


def leg(
    broker: EmbeddedBroker, pub: object, items: list[tuple[str, bytes]], topic_filter: str, pids: list[int]
) -> tuple[float, float]:
    """Publish ``items``; the rate at which ``topic_filter`` messages (one per item) reached a counting child, and
    the CPU ms per item of every process involved: this one (the publisher), the counter, the broker, ``pids``."""
    n = len(items)
    counter = start_counter(broker.port, topic_filter, n, 300)
    before = os.times()
    others0 = cpu_of([broker.pid or 0, *pids])
    t0 = publish_all(pub, items)  # type: ignore[arg-type]
    rate, counter_cpu = finish_counted(counter, n, t0)  # the counter's CPU after it subscribed: not its start-up
    after = os.times()
    own = sum(getattr(after, f) - getattr(before, f) for f in ("user", "system"))
    return rate, 1e3 * (own + counter_cpu + cpu_of([broker.pid or 0, *pids]) - others0) / n


def measure_on(
    setup: Setup, broker: EmbeddedBroker, work: Path, mdir: Path, plan: dict, pool: list, n: int, repeats: int
) -> dict:
    ids = [f"phone{i:03d}" for i in range(16)]
    per_client = -(-n // len(ids))
    tag = setup.label.replace(" ", "").replace("/", "-").replace("+", "-")
    pub = publisher(broker.port)
    with ExitStack() as stack:
        if setup.backend == "postgres":
            state = stack.enter_context(fresh_database())
            keys = ["--key-dir", str(work / f"keys-{tag}")]
        else:
            state, keys = str(work / f"state-{tag}"), []
        procs = []
        try:
            if setup.aggregator:
                procs.append(
                    start_server(broker.url, work, mdir, n, None, state, ["--role", "aggregator", *keys], f"{tag}-agg")
                )
            extra = ["--role", setup.role, *(keys if setup.role != "ingest" else [])]
            for i in range(setup.processes):
                procs.append(start_server(broker.url, work, mdir, n, None, state, extra, f"{tag}-{i}"))
            servers = procs[1:] if setup.aggregator else procs
            say_hello(pub, ids, plan)
            wait_for(
                f"{setup.label}: hellos", lambda: sum(scrape(port).get(HELLOS, 0.0) for _, port in servers) >= len(ids)
            )
            db_pids = backend_pids(state) if setup.backend == "postgres" else []
            seq0 = 0
            warm = update_payloads(pool, ids, 2 * len(ids), seq0, deflate=False)  # every process meets the clients
            seq0 += 2
            counter = start_counter(broker.port, f"fedhft/v1/{TASK}/ack/+", len(warm), 120)
            finish(counter, len(warm), publish_all(pub, warm))
            runs = []
            server_pids = [p.pid for p, _ in procs]
            for _ in range(repeats):  # pass-through before and after each ingest run: their mean is its reference
                updates = update_payloads(pool, ids, n, seq0, deflate=False)
                seq0 += per_client
                passing = [(f"bench/pass/{t.rsplit('/', 1)[1]}", p) for t, p in updates]
                pass_before, pass_cpu = leg(broker, pub, passing, "bench/pass/+", [])
                load = os.getloadavg()[0]
                cpu0, db0 = cpu_of(server_pids), cpu_of(db_pids)
                ingest, ingest_cpu = leg(broker, pub, updates, f"fedhft/v1/{TASK}/ack/+", server_pids + db_pids)
                cpu_ms = 1e3 * (cpu_of(server_pids) - cpu0) / n
                db_ms = 1e3 * (cpu_of(db_pids) - db0) / n
                pass_after, _ = leg(broker, pub, passing, "bench/pass/+", [])
                runs.append(
                    {"passthrough_per_s": (pass_before + pass_after) / 2, "ingest_per_s": ingest, "cpu_ms": cpu_ms,
                     "db_cpu_ms": db_ms, "pass_total_cpu_ms": pass_cpu, "ingest_total_cpu_ms": ingest_cpu,
                     "load": load}
                )  # fmt: skip
            sent = len(warm) + repeats * n
            accepted = sum(scrape(port).get(ACCEPTED, 0.0) for _, port in servers)
            if accepted != sent:
                raise RuntimeError(f"{setup.label}: {accepted} of {sent} updates accepted")
            shares = [int(scrape(port).get(ACCEPTED, 0.0)) for _, port in servers]
        finally:
            for p, _ in procs:
                stop_process(p)
            pub.loop_stop()
            pub.disconnect()
    print(f"{setup.label}: {[{k: round(v, 1) for k, v in r.items()} for r in runs]}", flush=True)
    pass_rate = median(r["passthrough_per_s"] for r in runs)
    ingest_rate = median(r["ingest_per_s"] for r in runs)
    ratios = [r["ingest_per_s"] / r["passthrough_per_s"] for r in runs]
    pass_cpu, ingest_cpu = median(r["pass_total_cpu_ms"] for r in runs), median(r["ingest_total_cpu_ms"] for r in runs)
    return {
        "setup": setup.label,
        "backend": setup.backend,
        "role": setup.role,
        "processes": setup.processes,
        "aggregator_running": setup.aggregator,
        "passthrough_per_s": round(pass_rate, 1),
        "ingest_per_s": round(ingest_rate, 1),
        "ratio": round(median(ratios), 3),  # of the paired runs: each ingest run against its own pass-through
        "ratio_runs": [round(x, 3) for x in ratios],
        "total_cpu_ms_per_message": {"passthrough": round(pass_cpu, 2), "ingest": round(ingest_cpu, 2)},
        "cpu_ratio": round(pass_cpu / ingest_cpu, 3),
        "server_cpu_ms_per_update": round(median(r["cpu_ms"] for r in runs), 2),
        "db_cpu_ms_per_update": round(median(r["db_cpu_ms"] for r in runs), 2) if setup.backend == "postgres" else None,
        "load_1m": round(median(r["load"] for r in runs), 2),
        "accepted_per_process": shares,
        "runs": [{k: round(v, 2) for k, v in r.items()} for r in runs],
    }


def store_writer(url: str, writer: int, batches: int, payload_bytes: int, out: multiprocessing.Queue) -> None:
    """One process storing ``batches`` commits of 16 updates as an ingest process does; puts (start, end)."""
    from fedhft.broker_server.state_pg import PgStateStore
    from fedhft.broker_server.state_schema import StagedUpdate

    payload = np.random.default_rng(writer).bytes(payload_bytes)
    store = PgStateStore(url, TASK, "f" * 64, None, role="ingest")
    ids = [f"w{writer}-{c}" for c in range(16)]
    for cid in ids:
        store.upsert_client(cid, PROFILE, "ab" * 32, {})
    t0 = time.time()
    for b in range(batches):
        store.latest_version_number()
        store.registrations(ids)
        store.commit_updates([StagedUpdate(c, b + 1, 0, 32, 0.7, time.time(), 1.0, payload, {}) for c in ids])
    out.put((t0, time.time()))
    store.close()


def store_scaling(payload_bytes: int, total_batches: int = 48) -> list[dict]:
    """Updates/s that 1, 2 and 4 processes store together, each on a fresh database."""
    from fedhft.broker_server.state_pg import PgStateStore

    rows = []
    for k in (1, 2, 4):
        with fresh_database() as url:
            PgStateStore(url, TASK, "f" * 64, None, role="ingest").close()  # the schema, before the writers race
            out: multiprocessing.Queue = multiprocessing.Queue()
            procs = [
                multiprocessing.Process(target=store_writer, args=(url, w, total_batches // k, payload_bytes, out))
                for w in range(k)
            ]
            for proc in procs:
                proc.start()
            spans = [out.get(timeout=300) for _ in procs]
            for proc in procs:
                proc.join()
            rate = k * (total_batches // k) * 16 / (max(e for _, e in spans) - min(s for s, _ in spans))
            rows.append({"processes": k, "stored_per_s": round(rate, 1), "load_1m": round(os.getloadavg()[0], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=400, help="updates per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="160 updates, 1 repeat")
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest_scaling.json")
    a = ap.parse_args()
    n, repeats = (160, 1) if a.quick else (a.updates, a.repeats)
    work = Path(tempfile.mkdtemp(prefix="fedhft-scaling-"))
    try:
        mdir, plan, spec, cplan = bench_manifest(work)
        rng = np.random.default_rng(0)
        pool = [random_update_tensors(rng, spec, cplan) for _ in range(8)]
        load_before = os.getloadavg()
        rows = [measure_setup(s, work, mdir, plan, pool, n, repeats) for s in SETUPS]
        payload_bytes = len(update_payloads(pool, ["phone000"], 1, 0, deflate=False)[0][1])
        store_rows = store_scaling(payload_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    two = next(r for r in rows if r["role"] == "ingest" and r["processes"] == 2 and not r["aggregator_running"])
    goal = {
        "goal": "ingest with 2 processes >= 50% of the broker's pass-through for the same payloads",
        "ratio_2_processes": two["ratio"],
        "cpu_ratio_2_processes": two["cpu_ratio"],
        "met": two["ratio"] >= 0.5,
    }
    loads = tuple(round(x, 2) for x in load_before)
    print(f"\ningest scaling: {n} updates per run from 16 clients via {rows[0]['broker']} (a fresh one per setup), "
          f"median of {repeats}; host cpus {os.cpu_count()}, load (1, 5, 15 min) at start {loads}")  # fmt: skip
    cols = ["setup", "passthrough_per_s", "ingest_per_s", "ratio", "cpu_ratio", "server_cpu_ms_per_update"]
    cols += ["db_cpu_ms_per_update", "load_1m"]
    print(table(rows, cols))
    print(f"\nthe database alone ({payload_bytes} B payloads, 16 per commit, as ingest processes store them):")
    print(table(store_rows, ["processes", "stored_per_s", "load_1m"]))
    print(f"\ngoal: {goal['goal']}: {two['ratio']:.0%} -> {'met' if goal['met'] else 'NOT met'}")
    result = {
        "model": "MiniLM-L6-H384 shapes (6 layers, hidden 384, intermediate 1536, 5 labels, seq 128, batch 8)",
        "profile": PROFILE,
        "payload": "fp16, stored (as encoders send: zlib saves < 15%)",
        "updates_per_run": n,
        "clients": 16,
        "repeats": repeats,
        "broker": rows[0]["broker"],
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load_at_start": load_before},
        "sqlite_note": "roles need --state postgresql://...: a SQLite state dir is single-process (one row)",
        "payload_bytes": payload_bytes,
        "rows": rows,
        "store_only": store_rows,
        "goal": goal,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
