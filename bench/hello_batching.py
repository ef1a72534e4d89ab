"""Registration rate of a wave of hellos, one commit per hello (before) vs one per drained batch (after).

In process, no broker: a server (MiniLM shapes, the phone-midrange-6gb plan, manifest built in code) is handed
N hellos of new devices either one per ``handle_batch`` call (what every hello cost before hellos were batched:
its own transaction and its own model publication) or in batches of the server's ``max_batch`` (as drained from
a busy inbox: one transaction per batch, the models encoded and signed per client in the pool). Both state
backends: a SQLite state directory and a throwaway PostgreSQL database. Each mode starts on fresh state.

Writes bench/results/hello_batching.json and prints a table.
Run: `nice -n 10 .venv/bin/python bench/hello_batching.py [--hellos 1000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (the throwaway database) and this checkout's fedhft

from bench.server_ingest import PROFILE, SHA, TASK, bench_manifest  # noqa: E402
from fedhft.broker_server.federation import FederationConfig  # noqa: E402
from fedhft.broker_server.ingest import Inbound  # noqa: E402
from fedhft.broker_server.service import Server, ServerConfig  # noqa: E402
from fedhft.protocol import HelloMessage, encode_hello, hello_topic  # noqa: E402
from tests.support.postgres import fresh_database  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def measure(backend: str, batch: int, n: int, workdir: Path) -> dict:
    """Hellos/s of ``n`` new devices handed to a fresh server ``batch`` at a time."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        mdir, plan, _, _ = bench_manifest(tmp)
        if backend == "sqlite":
            spec: str | Path = tmp / "state"
            key_dir = None
        else:
            spec, key_dir = stack.enter_context(fresh_database()), tmp / "keys"
        config = ServerConfig(
            broker="mqtt://127.0.0.1:1",  # never connected: models are encoded and signed, not sent
            task=TASK,
            state_dir=spec,
            key_dir=key_dir,
            manifest=mdir,
            federation=FederationConfig(buffer_size=10**6, window_seconds=1e6),
        )
        server = Server(config)
        stack.callback(server.shutdown)
        msgs = [
            Inbound(
                hello_topic(TASK, f"d{i:05d}"),
                encode_hello(HelloMessage(TASK, f"d{i:05d}", PROFILE, SHA, plan, time.time())),
                i,
                0,
                time.time(),
            )
            for i in range(n)
        ]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(0, n, batch):
            server.handle_batch(msgs[i : i + batch])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert len(server.ingest.registry) == n, "not every hello was registered"
    return {
        "backend": backend,
        "batch": batch,
        "hellos": n,
        "seconds": round(wall, 3),
        "hellos_per_s": round(n / wall, 1),
        "ms_per_hello": round(1000 * wall / n, 3),
        "cpu_ms_per_hello": round(1000 * cpu / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hellos", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    ap.add_argument("--out", type=Path, default=RESULTS / "hello_batching.json")
    a = ap.parse_args()
    batch = ServerConfig.__dataclass_fields__["max_batch"].default
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for backend in a.backends:
            for size in (1, batch):
                rows.append(measure(backend, size, a.hellos, Path(work)))
                print(json.dumps(rows[-1]), flush=True)
    cols = ["backend", "batch", "hellos", "hellos_per_s", "ms_per_hello", "cpu_ms_per_hello"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    speedup = {
        b: round(
            next(r for r in rows if r["backend"] == b and r["batch"] == batch)["hellos_per_s"]
            / next(r for r in rows if r["backend"] == b and r["batch"] == 1)["hellos_per_s"],
            2,
        )
        for b in a.backends
    }
    print("speedup (batched / one per call):", speedup)
    result = {
        "what": "hellos/s of new devices: one handle_batch per hello (one commit + one model each, as before "
        f"batching) vs batches of max_batch={batch} (one commit per batch); in process, models encoded and signed",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "rows": rows,
        "speedup": speedup,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
