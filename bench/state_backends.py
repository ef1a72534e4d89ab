"""The server's durable store on both backends, in process: SQLite state dir vs PostgreSQL database.

What the store costs per acknowledged update (the group commit that must finish before an ack), for group
commits of 1, 16 and 64 updates of ``--payload-bytes`` (default 100 kB, the size of a MiniLM update under the
phone-midrange-6gb plan in bench/results/server_ingest.json); the durable commit of one version (its cluster
states, its updates marked aggregated); and a restart (open + read back every pending update's payload).
Payload bytes are random: the store keeps payloads as received and never parses them.

PostgreSQL: a fresh database on the server of FEDHFT_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test), dropped afterwards. Both run on this machine's one disk.
Writes bench/results/state_backends.json. Run: `.venv/bin/python bench/state_backends.py [--updates 640]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (the throwaway database) and this checkout's fedhft

from fedhft.broker_server.aggregation import ClusterState  # noqa: E402
from fedhft.broker_server.state_backend import StateBackend, open_state  # noqa: E402
from fedhft.broker_server.state_schema import StagedUpdate  # noqa: E402
from tests.support.postgres import fresh_database  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FINGERPRINT = "b" * 64
PLAN = {"bench": True}


def staged(cid: str, seq: int, payload: bytes) -> StagedUpdate:
    return StagedUpdate(cid, seq, 0, 32, 0.7, time.time(), 1.0, payload, {})


def measure(
    store: StateBackend, reopen: Callable[[], StateBackend], n: int, batch: int, payload_bytes: int, clients: int
) -> dict:
    rng = np.random.default_rng(batch)
    payloads = [rng.bytes(payload_bytes) for _ in range(8)]
    ids = [f"dev{i:03d}" for i in range(clients)]
    for cid in ids:
        store.upsert_client(cid, "p", "ab" * 32, PLAN)
    seq = {cid: 0 for cid in ids}
    times = []
    stored_ids: list[int] = []
    for start in range(0, n, batch):
        group = []
        for j in range(start, min(n, start + batch)):
            cid = ids[j % clients]
            seq[cid] += 1
            group.append(staged(cid, seq[cid], payloads[j % 8]))
        t0 = time.perf_counter()
        stored_ids += [s.id for s in store.commit_updates(group)]
        times.append(time.perf_counter() - t0)
    total = sum(times)
    state = ClusterState(
        modules={f"layers.{i}.query": rng.standard_normal((384, 384)) for i in range(6)},
        head={"head.weight": rng.standard_normal((5, 384)), "head.bias": np.zeros(5)},
    )
    t0 = time.perf_counter()
    store.commit_version(1, [state], stored_ids[: n // 2], {cid: [1.0] for cid in ids}, {"aggregations": "1"})
    version_ms = (time.perf_counter() - t0) * 1000
    store.close()
    t0 = time.perf_counter()
    store = reopen()
    pending = store.load_pending()
    read = sum(len(store.load_payload(p)) for p in pending)
    restart_s = time.perf_counter() - t0
    store.close()
    assert len(pending) == n - n // 2 and read == sum(len(payloads[j % 8]) for j in range(n // 2, n))
    return {
        "batch": batch,
        "updates": n,
        "updates_per_s": round(n / total, 1),
        "commit_ms_median": round(median(times) * 1000, 2),
        "version_commit_ms": round(version_ms, 1),
        "version_state_mb": round(sum(v.nbytes for v in state.modules.values()) / 1e6, 1),
        "restart_s": round(restart_s, 3),
        "restart_pending": len(pending),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=640)
    ap.add_argument("--payload-bytes", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", type=Path, default=RESULTS / "state_backends.json")
    a = ap.parse_args()
    rows = []
    for batch in a.batches:
        for backend in ("sqlite", "postgres"):
            with ExitStack() as stack:
                if backend == "sqlite":
                    spec: str | Path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "state"
                    key_dir = None
                else:
                    spec = stack.enter_context(fresh_database())
                    key_dir = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "keys"

                def reopen(spec: str | Path = spec, key_dir: Path | None = key_dir) -> StateBackend:
                    return open_state(spec, "bench", FINGERPRINT, key_dir)

                row = {"backend": backend} | measure(reopen(), reopen, a.updates, batch, a.payload_bytes, a.clients)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "what": "StateBackend.commit_updates (the group commit before an ack), commit_version, restart",
        "payload_bytes": a.payload_bytes,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
