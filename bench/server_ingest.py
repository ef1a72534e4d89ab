"""Server ingest rate through Mosquitto on loopback vs the broker's raw pass-through, and aggregation cost.

Update size: the packaged MiniLM (6 layers, hidden 384, intermediate 1536, 12 heads, 5 labels, seq 128,
batch 8) under the LEGEND plan for `phone-midrange-6gb` (random masked updates of exactly that shape,
fp16 on the wire). The manifest is built in code (no export needed).

1. Pass-through: one publisher (this process) sends N payloads QoS 1 to a plain subscriber (a child
   process); rate = N / (last receipt - first publish).
2. Ingest: the same N payloads as updates of K registered clients to `fedhft server run` (a child
   process, aggregation held off); rate = N / (last accepted ack - first publish), acks counted by a child
   process like the pass-through subscriber. Goal: >= 50% of pass-through.
3. Aggregation time (in process): Federation.aggregate, the durable version commit, and building every
   client's model, vs the number of buffered updates (4/16/64) and vs the adapter rank (4/8/16).

Writes bench/results/server_ingest.json and prints tables. Run: `.venv/bin/python bench/server_ingest.py
[--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import numpy as np
import paho.mqtt.client as mqtt

from fedhft.broker_server.broker.embedded import EmbeddedBroker
from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate
from fedhft.broker_server.metrics import parse_metrics
from fedhft.broker_server.service import limit_blas_threads
from fedhft.broker_server.state_store import StagedUpdate, StateStore
from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.device_profiles.planner import plan_lora
from fedhft.device_profiles.profile import load_profile
from fedhft.protocol import (
    HelloMessage,
    ModelMessage,
    UpdateMessage,
    encode_hello,
    encode_model,
    encode_update,
    generate_keypair,
)
from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, KIND_UPDATE, unwrap, wrap
from fedhft.protocol.manifest import write_manifest
from fedhft.protocol.mqtt import make_client
from fedhft.simulate.load_plan import MINILM_SHAPE, random_update_tensors, shapes_manifest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPE = MINILM_SHAPE
PROFILE = "phone-midrange-6gb"
TASK = "bench"
SHA = "ab" * 32

COUNTER = r"""
import json, sys, threading, time
from fedhft.protocol.mqtt import make_client
port, topic_filter, n, timeout = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
times, done, lock = [], threading.Event(), threading.Lock()
def on_message(_c, _u, msg):
    with lock:
        times.append(time.time())
        if len(times) >= n:
            done.set()
c = make_client(f"counter-{port}-{time.time()}")
subscribed = threading.Event()
c.on_message, c.on_subscribe = on_message, (lambda *a: subscribed.set())
c.connect("127.0.0.1", port)
c.loop_start()
c.subscribe(topic_filter, qos=1)
subscribed.wait(10)
print("ready", flush=True)
cpu0 = time.process_time()  # what it costs from here on is the messages', not the interpreter's start
done.wait(timeout)
cpu = time.process_time() - cpu0
c.loop_stop()
print(json.dumps({"count": len(times), "first": times[0] if times else None, "last": times[-1] if times else None,
                  "cpu": cpu}))
"""


# ---------------------------------------------------------------------------------------------- setup


def rewrapped(payload: bytes, deflate: bool) -> bytes:
    """The same (unsigned) update with its body deflated or stored, whatever the encoder chose."""
    return wrap(KIND_UPDATE, unwrap(payload, KIND_UPDATE, DEFAULT_MAX_BYTES).raw, deflate=deflate)


def rank_plan(rank: int, base: dict) -> dict:
    return dict(base, layers=[{"layer": lp["layer"], "rank": rank, "targets": lp["targets"]} for lp in base["layers"]])


# ---------------------------------------------------------------------------------------------- ingest


def start_counter(port: int, topic_filter: str, n: int, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", COUNTER, str(port), topic_filter, str(n), str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def publisher(port: int) -> mqtt.Client:
    c = make_client("bench-pub")
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, items: list[tuple[str, bytes]]) -> float:
    t0 = time.time()
    infos = [c.publish(topic, payload, qos=1) for topic, payload in items]
    for info in infos:
        info.wait_for_publish(120)
    return t0


def finish(counter: subprocess.Popen, n: int, t0: float) -> float:
    """The rate at which the counter's ``n`` messages arrived since ``t0``."""
    return finish_counted(counter, n, t0)[0]


def finish_counted(counter: subprocess.Popen, n: int, t0: float) -> tuple[float, float]:
    """(rate since ``t0``, CPU seconds the counter spent once subscribed: its start-up excluded)."""
    out, _ = counter.communicate(timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    if got["count"] < n:
        raise RuntimeError(f"only {got['count']} of {n} messages arrived")
    return n / (got["last"] - t0), got["cpu"]


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return parse_metrics(r.read().decode())
    except OSError:
        return {}


def start_server(
    broker_url: str,
    workdir: Path,
    mdir: Path,
    n: int,
    profile: Path | None = None,
    state: str | None = None,
    extra: Sequence[str] = (),
    name: str = "server",
) -> tuple[subprocess.Popen, int]:
    """`fedhft server run` as a child (under bench/profile_threads.py when ``profile`` names its output), with
    aggregation held off; ``state`` defaults to ``workdir/state``, ``extra`` adds options (``--role ...``)."""
    metrics_port = _free_port()
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
    launcher = ["-m", "fedhft.cli"] if profile is None else [str(ROOT / "bench" / "profile_threads.py"), str(profile)]
    server = subprocess.Popen(
        [
            sys.executable, *launcher, "server", "run",
            "--broker", broker_url, "--task", TASK, "--state", state or str(workdir / "state"),
            "--manifest", str(mdir), "--buffer-size", str(100 * n), "--window-seconds", "1e6",
            "--max-staleness", "1000", "--metrics-port", str(metrics_port), *extra,
        ],
        stderr=log,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    deadline = time.time() + 30
    while scrape(metrics_port).get("fedhft_ready") != 1.0:
        if time.time() > deadline or server.poll() is not None:
            raise RuntimeError(f"{name} did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    return server, metrics_port


def bench_manifest(workdir: Path) -> tuple[Path, dict, GlobalSpec, ClientPlan]:
    """The phone-midrange-6gb plan on MiniLM shapes: its manifest dir (written), plan, spec and client plan."""
    plan = plan_lora(SHAPE, load_profile(PROFILE)).to_dict()
    manifest = shapes_manifest(plan, PROFILE)
    mdir = workdir / "manifest"
    mdir.mkdir()
    write_manifest(manifest, mdir)
    spec = GlobalSpec.from_manifest(manifest)
    return mdir, plan, spec, ClientPlan.from_plan(plan, spec)


def say_hello(pub: mqtt.Client, ids: Sequence[str], plan: dict) -> None:
    for cid in ids:
        hello = HelloMessage(TASK, cid, PROFILE, SHA, plan, time.time())
        pub.publish(f"fedhft/v1/{TASK}/hello/{cid}", encode_hello(hello), qos=1).wait_for_publish(10)


def update_payloads(
    pool: Sequence[dict], ids: Sequence[str], n: int, seq0: int, deflate: bool
) -> list[tuple[str, bytes]]:
    """``n`` updates (topic, payload) round-robin over ``ids`` with seqs from ``seq0 + 1``, tensors from ``pool``."""
    out = []
    for j in range(n):
        cid, seq = ids[j % len(ids)], seq0 + j // len(ids) + 1
        msg = UpdateMessage(TASK, cid, seq, 0, 32, 0.7, {}, PROFILE, SHA, time.time(), pool[j % len(pool)])
        out.append((f"fedhft/v1/{TASK}/update/{cid}", rewrapped(encode_update(msg, "fp16"), deflate=deflate)))
    return out


def measure_ingest(n: int, clients: int, repeats: int, workdir: Path, profile: Path | None = None) -> list[dict]:
    """Median pass-through and ingest rates (and the server's CPU ms per update), for deflated payloads and stored
    ones (what encoders send when zlib saves < 15%, as it does for these tensors)."""
    mdir, plan, spec, cplan = bench_manifest(workdir)
    rng = np.random.default_rng(0)
    pool = [random_update_tensors(rng, spec, cplan) for _ in range(8)]
    ids = [f"phone{i:03d}" for i in range(clients)]
    per_client = -(-n // clients)
    rows = []
    with EmbeddedBroker(port=0) as broker:
        pub = publisher(broker.port)
        server, metrics_port = start_server(broker.url, workdir, mdir, n, profile)
        try:
            say_hello(pub, ids, plan)
            seq0 = 0
            for variant in ("deflated (zlib forced)", "stored (as encoders send: zlib saves < 15%)"):
                rates: list[tuple[float, float]] = []
                cpu_ms: list[float] = []
                size = 0
                for _ in range(repeats):
                    updates = update_payloads(pool, ids, n, seq0, deflate="deflated" in variant)
                    seq0 += per_client
                    size = len(updates[0][1])
                    counter = start_counter(broker.port, "bench/pass/+", n, 300)
                    t0 = publish_all(pub, [(f"bench/pass/{t.rsplit('/', 1)[1]}", p) for t, p in updates])
                    passthrough = finish(counter, n, t0)
                    counter = start_counter(broker.port, f"fedhft/v1/{TASK}/ack/+", n, 300)
                    cpu0 = cpu_seconds(server.pid)
                    t0 = publish_all(pub, updates)
                    rates.append((passthrough, finish(counter, n, t0)))
                    cpu_ms.append(1e3 * (cpu_seconds(server.pid) - cpu0) / n)
                pass_rate, ingest_rate = median(r[0] for r in rates), median(r[1] for r in rates)
                rows.append(
                    {
                        "payload": variant,
                        "payload_bytes": size,
                        "passthrough_per_s": round(pass_rate, 1),
                        "ingest_per_s": round(ingest_rate, 1),
                        "ratio": round(ingest_rate / pass_rate, 3),
                        "server_cpu_ms_per_update": round(median(cpu_ms), 2),
                        "runs": [[round(a, 1), round(b, 1)] for a, b in rates],
                    }
                )
            accepted = scrape(metrics_port).get('fedhft_updates_total{reason="",status="accepted"}')
            if accepted != 2 * repeats * n:
                raise RuntimeError(f"the server accepted {accepted} of {2 * repeats * n} updates")
        finally:
            server.terminate()
            server.wait(timeout=30)
        pub.loop_stop()
        pub.disconnect()
        for row in rows:
            row |= {"updates": n, "clients": clients, "broker": broker.chosen}
    common = {
        "depth": len(plan["layers"]),
        "ranks": [lp["rank"] for lp in plan["layers"]],
        "targets": plan["layers"][0]["targets"],
        "mask_ratio": plan["mask_ratio"],
    }
    for row in rows:
        row["plan"] = common
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- aggregation


def measure_aggregation(n_updates: int, rank: int, repeats: int, workdir: Path) -> dict:
    base = plan_lora(SHAPE, load_profile(PROFILE)).to_dict()
    plan = rank_plan(rank, base)
    manifest = shapes_manifest(plan, PROFILE)
    spec = GlobalSpec.from_manifest(manifest)
    cplan = ClientPlan.from_plan(plan, spec)
    rng = np.random.default_rng(rank * 1000 + n_updates)
    tensors = []
    for i in range(n_updates):
        t = random_update_tensors(rng, spec, cplan)
        msg = UpdateMessage(TASK, f"c{i}", 1, 0, 32, 0.5, {}, PROFILE, SHA, time.time(), t)
        tensors.append((t, encode_update(msg, "fp16")))
    agg, persist, models = [], [], []
    key, _ = generate_keypair()
    for rep in range(repeats):
        state_dir = workdir / f"agg-{n_updates}-{rank}-{rep}"
        store = StateStore(state_dir, TASK, spec.fingerprint())
        fed = Federation(spec, FederationConfig(buffer_size=n_updates))
        for i in range(n_updates):
            cid = f"c{i}"
            fed.register(cid, cplan)
            store.upsert_client(cid, PROFILE, SHA, plan)
        stored = store.commit_updates(
            [StagedUpdate(f"c{i}", 1, 0, 32, 0.5, time.time(), 1.0, p, t) for i, (t, p) in enumerate(tensors)]
        )
        for s, (t, _) in zip(stored, tensors, strict=True):
            fed.add_pending(PendingUpdate(s.id, s.client_id, 1, 0, 32, s.received_at, t))
        t0 = time.perf_counter()
        result = fed.aggregate()
        t1 = time.perf_counter()
        memberships = {cid: list(p) for cid, p in result.memberships.items()}
        store.commit_version(result.version, result.states, result.aggregated_ids, memberships, {"aggregations": "1"})
        t2 = time.perf_counter()
        fed.apply(result)
        for m in fed.client_models() + fed.cluster_models():  # factor, encode and sign, as the server publishes
            encode_model(ModelMessage(TASK, fed.version, m.target, time.time(), "", dict(m.meta), m.tensors), key)
        t3 = time.perf_counter()
        store.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        agg.append(t1 - t0)
        persist.append(t2 - t1)
        models.append(t3 - t2)
    return {
        "updates": n_updates,
        "rank": rank,
        "modules": len(cplan.ranks),
        "aggregate_ms": round(1e3 * median(agg), 1),
        "persist_ms": round(1e3 * median(persist), 1),
        "models_ms": round(1e3 * median(models), 1),
        "models_note": f"factor, encode and sign {n_updates} client models + 1 cluster model",
    }


# ---------------------------------------------------------------------------------------------- main


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=400, help="updates per ingest run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer updates and repeats")
    ap.add_argument("--out", type=Path, default=RESULTS / "server_ingest.json")
    ap.add_argument(
        "--profile-server", type=Path, default=None, help="cProfile the server (all threads) into this file"
    )
    ap.add_argument("--ingest-only", action="store_true", help="skip the aggregation tables (and do not write --out)")
    a = ap.parse_args()
    limit_blas_threads(1)  # as the server does
    n = 160 if a.quick else a.updates
    repeats = 1 if a.quick else a.repeats
    work = Path(tempfile.mkdtemp(prefix="fedhft-bench-"))
    try:
        ingest = measure_ingest(n, a.clients, repeats, work, a.profile_server)
        first = ingest[0]
        print(
            f"\ningest: {n} updates ({PROFILE} plan on MiniLM: {first['plan']}, fp16) from {a.clients} clients "
            f"via {first['broker']}, median of {repeats}"
        )
        print(
            table(
                ingest,
                ["payload", "payload_bytes", "passthrough_per_s", "ingest_per_s", "ratio", "server_cpu_ms_per_update"],
            )
        )
        if a.ingest_only:
            return
        by_n = [measure_aggregation(k, 16, repeats, work) for k in (4, 16, 64)]
        by_rank = [measure_aggregation(16, r, repeats, work) for r in (4, 8, 16)]
        cols = ["updates", "rank", "modules", "aggregate_ms", "persist_ms", "models_ms"]
        print("\naggregation vs buffered updates (rank 16):")
        print(table(by_n, cols))
        print("\naggregation vs adapter rank (16 updates):")
        print(table(by_rank, cols))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": "MiniLM-L6-H384 shapes (6 layers, hidden 384, intermediate 1536, 5 labels, seq 128, batch 8)",
        "profile": PROFILE,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "ingest": ingest,
        "aggregation_vs_updates": by_n,
        "aggregation_vs_rank": by_rank,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
