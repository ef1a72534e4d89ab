"""Resource faults, for real: a full disk under `fedhft server run`, and a device whose files are corrupted.

Full disk: the server's state dir is a small tmpfs mounted by the test (always unmounted in a finally);
where mounting is not permitted the test limits the server's file size instead (RLIMIT_FSIZE via
prlimit), which fails its writes the same way (EFBIG instead of ENOSPC). The test is never skipped.

Corrupted device: `fedhft edge run` (a child process, against Mosquitto and the stub server) on an
exported package with a flipped or truncated artifact, and on a state dir whose files are damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.state_store import StateStore
from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.protocol import decode_model, encode_update, update_topic
from fedhft.protocol.manifest import load_manifest, sha256_file
from tests.edge_runtime.test_client import Fed
from tests.support import ROOT
from tests.support.mosquitto import Mosquitto
from tests.support.server import Hub, ServerProcess, update_message, update_tensors, wait_until

TASK = "faults"
DISK_KB = 3072
HEADROOM = 90 * 1024  # free bytes left next to the filler: room for about two updates of the tiny plan
DISK_FULL = 'fedhft_updates_total{reason="disk_full",status="error"}'
RLIMIT_BYTES = 20 * 1024  # below one update's batch file (about 35 kB), above the server's log and WAL so far
STORE_FAILED = "could not store updates; not acknowledged"


@contextlib.contextmanager
def small_disk(path: Path, mode: str) -> Iterator[str]:
    """``path`` as a DISK_KB tmpfs (yields "tmpfs"), or a plain folder (yields "rlimit") when ``mode`` asks
    for it or mounting is not permitted here. Unmounted on the way out, whatever happened."""
    path.mkdir()
    if mode == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k,mode=0755", "tmpfs", str(path)]
        try:
            mounted = subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
        except OSError:
            mounted = False
        if mounted:
            try:
                yield "tmpfs"
            finally:
                for _ in range(20):  # the server may still be closing its files
                    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode == 0:
                        break
                    time.sleep(0.25)
                else:
                    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
            return
    yield "rlimit"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, keep_free: int) -> Path:
    """A filler file that leaves about ``keep_free`` bytes free on ``path``'s file system."""
    filler = path / "filler.bin"
    size = max(0, free_bytes(path) - keep_free)
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 16)
        while size > 0:
            size -= fh.write(chunk[: min(size, len(chunk))])
        fh.flush()
        os.fsync(fh.fileno())
    return filler


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def db_rows(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def model_version(hub: Hub, target: str) -> int | None:
    payload = hub.latest_model(target)
    return None if payload is None else decode_model(payload).version


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_full_disk_is_a_clear_error_acks_nothing_unstored_and_the_server_carries_on(
    mode: str, mosquitto: Mosquitto, tiny_export: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(tiny_export)
    spec = GlobalSpec.from_manifest(manifest)
    plan = ClientPlan.from_plan(dict(manifest.plan), spec)
    rng = np.random.default_rng(0)
    state = tmp_path / "state"
    payloads: dict[int, bytes] = {}

    def send(seq: int) -> None:
        if seq not in payloads:  # a device resends the same bytes from its outbox
            payloads[seq] = encode_update(update_message(TASK, "a", seq, update_tensors(rng, spec, plan)), "fp32")
        hub.publish(update_topic(TASK, "a"), payloads[seq])

    with small_disk(state, mode) as used:
        server = ServerProcess(mosquitto.url, TASK, state, tiny_export, "--buffer-size", "4", "--window-seconds", "600")
        hub = Hub(mosquitto.port, TASK)
        try:
            server.start()
            hub.hello("a", dict(manifest.plan))
            assert wait_until(lambda: model_version(hub, "client/a") == 0, 15), server.log_text()[-2000:]
            if used == "tmpfs":
                filler = fill(state, HEADROOM)
            else:
                assert server.proc is not None
                _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
                resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (RLIMIT_BYTES, hard))

            # feed updates until one cannot be stored: it is not acknowledged, and the server says why
            accepted: list[int] = []
            lost = None
            for seq in range(1, 30):
                failures = server.log_text().count(STORE_FAILED)
                send(seq)
                settled = wait_until(
                    lambda s=seq, f=failures: (
                        hub.ack_status("a", s) is not None or server.log_text().count(STORE_FAILED) > f
                    ),
                    30,
                )
                assert settled, server.log_text()[-2000:]
                if hub.ack_status("a", seq) is None:
                    lost = seq
                    break
                assert hub.ack_status("a", seq) == "accepted"
                accepted.append(seq)
            assert lost is not None, "the disk never filled up"
            time.sleep(1.0)
            assert hub.ack_status("a", lost) is None  # never acked: the device keeps it in its outbox
            assert server.proc is not None and server.proc.poll() is None  # still serving
            if used == "tmpfs":
                assert "disk full" in server.log_text()
                assert (server.scrape().get(DISK_FULL) or 0) >= 1
                filler.unlink()  # space is back
            else:
                resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))

            # the state is intact: SQLite checks out, the lost update left no row and no file behind
            db = state / "state.sqlite3"
            assert integrity(db) == "ok"
            rows = db_rows(db, "SELECT seq, status, tensor_file FROM updates ORDER BY seq")
            assert [(s, st) for s, st, _ in rows] == [(s, "pending") for s in accepted]
            on_disk = {p.name for p in (state / "updates").iterdir()}
            assert on_disk == {ref.split("#")[0] for _, _, ref in rows}

            # the server carries on: the device's resend is accepted, and the buffer aggregates
            send(lost)
            assert wait_until(lambda: hub.ack_status("a", lost) == "accepted", 15), server.log_text()[-2000:]
            seq = lost
            while len(accepted) + 1 + (seq - lost) < 4:
                seq += 1
                send(seq)
                assert wait_until(lambda s=seq: hub.ack_status("a", s) == "accepted", 15)
            assert wait_until(lambda: model_version(hub, "client/a") == 1, 30), server.log_text()[-3000:]
            assert server.stop() == 0
            assert integrity(db) == "ok"
            store = StateStore(state, TASK, spec.fingerprint())  # opens cleanly (and runs its recovery)
            try:
                assert store.latest_version() is not None and store.latest_version().version == 1
                statuses = db_rows(db, "SELECT status, COUNT(*) FROM updates GROUP BY status")
                assert statuses == [("aggregated", 4)]
            finally:
                store.close()
        finally:
            server.stop()
            hub.close()


# ---- a corrupted device -------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip every bit of one byte (the middle one by default), in place."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edge_run(fed: Fed, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`fedhft edge run` for client c1 as a child process (bounded by ``timeout``), one round of 5 steps."""
    cfg = fed.config("c1")
    args = [sys.executable, "-m", "fedhft.cli", "edge", "run", "--artifacts", str(cfg.artifacts)]
    args += ["--data", str(cfg.data), "--broker", cfg.broker, "--task", cfg.task, "--client-id", "c1"]
    args += ["--state-dir", str(cfg.state_dir), "--server-key", str(fed.key), "--local-steps", "5", "--rounds", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    return lines[0]


@pytest.fixture
def device(tiny_export: Path, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Fed]:
    """A federation (broker, stub server, key, data) around a private copy of the exported package."""
    package = tmp_path / "package"
    shutil.copytree(tiny_export, package)
    fed = Fed(package, mosquitto, tmp_path)
    try:
        yield fed
    finally:
        fed.stub.stop()


def test_a_corrupted_artifact_refuses_to_start_and_a_good_copy_recovers(device: Fed, tiny_export: Path) -> None:
    ort = device.export / "ort"
    flip_byte(ort / "training_model.onnx")  # a bit flip
    line = one_error_line(edge_run(device))
    assert "training_model.onnx" in line and "sha256" in line and "corrupt" in line
    shutil.copytree(tiny_export, device.export, dirs_exist_ok=True)
    with open(ort / "checkpoint", "r+b") as fh:  # a truncation
        fh.truncate(fh.seek(0, os.SEEK_END) // 2)
    line = one_error_line(edge_run(device))
    assert "checkpoint" in line and "sha256" in line and "corrupt" in line
    assert not device.stub.hellos  # it never went online
    shutil.copytree(tiny_export, device.export, dirs_exist_ok=True)  # recovery: a good copy of the package
    device.stub.publish_model(1, "client/c1", device.model)
    res = edge_run(device)
    assert res.returncode == 0 and "1 round(s) trained, 1 update(s) acked" in res.stdout, res.stderr[-2000:]


def test_corrupted_local_state_is_detected_and_reset_state_rejoins(device: Fed) -> None:
    state = device.tmp / "state-c1"
    device.stub.publish_model(1, "client/c1", device.model)
    res = edge_run(device)
    assert res.returncode == 0 and device.stub.updates[-1].seq == 0, res.stderr[-2000:]
    assert (state / "trainer.ckpt.sha256").read_text().strip() == sha256_file(state / "trainer.ckpt")

    # checkpoint, saved model and a queued update corrupted: each reported, and the device carries on
    flip_byte(state / "trainer.ckpt")
    flip_byte(state / "model.bin")
    (state / "outbox" / f"{7:020d}.update").write_bytes(bytes(b ^ 0x01 for b in device.stub.raw[0][0]))
    device.stub.publish_model(2, "client/c1", device.model)
    res = edge_run(device)
    assert res.returncode == 0 and "1 round(s) trained, 1 update(s) acked" in res.stdout, res.stderr[-2000:]
    assert "trainer.ckpt: sha256 mismatch, the checkpoint is corrupt" in res.stderr
    assert "the saved model does not verify" in res.stderr
    assert "dropping an unreadable queued update" in res.stderr
    assert device.stub.updates[-1].seq == 8 and device.stub.updates[-1].base_version == 2
    assert (state / "trainer.ckpt.sha256").read_text().strip() == sha256_file(state / "trainer.ckpt")  # healed

    # state.json corrupted: the device refuses to start, naming the file and the way out
    (state / "state.json").write_text('{"task": "sst", "next_seq": 9')  # cut short by a bad disk
    line = one_error_line(edge_run(device))
    assert "state.json" in line and "corrupt" in line and "--reset-state" in line
    before = time.time()
    res = edge_run(device, "--reset-state")
    assert res.returncode == 0 and "1 round(s) trained, 1 update(s) acked" in res.stdout, res.stderr[-2000:]
    assert "state reset: starting over" in res.stderr
    seq = device.stub.updates[-1].seq  # above every earlier seq, so a real server takes it (seqs only grow)
    assert seq >= int(before * 1000) and device.stub.updates[-1].base_version == 2
    assert json.loads((state / "state.json").read_text())["next_seq"] == seq + 1
    assert not list((state / "outbox").iterdir())


def test_checkpoint_sha256_and_reset_in_the_state_store(tmp_path: Path) -> None:
    from fedhft.edge_runtime.state import TRAINER_SHA_FILE, StateError, StateStore, restart_seq

    with StateStore(tmp_path / "s") as store:
        store.save_trainer(lambda p: p.write_bytes(b"weights" * 100))
        ckpt = store.trainer_checkpoint()
        assert ckpt is not None and (store.dir / TRAINER_SHA_FILE).read_text().strip() == sha256_file(ckpt)
        flip_byte(ckpt)
        with pytest.raises(StateError, match="sha256 mismatch, the checkpoint is corrupt"):
            store.trainer_checkpoint()
        (store.dir / TRAINER_SHA_FILE).unlink()  # saved before sha256 files existed: taken as it is
        assert store.trainer_checkpoint() == ckpt
        store.save_trainer(lambda p: p.write_bytes(b"new"))
        store.save_model(b"model")
        (store.outbox_dir / f"{3:020d}.update").write_bytes(b"queued")
        (store.dir / "trusted_key").write_text("kept")  # files the reset does not know stay
        removed = store.reset()
        assert sorted(removed) == sorted(["model.bin", "trainer.ckpt", TRAINER_SHA_FILE, f"outbox/{3:020d}.update"])
        assert store.trainer_checkpoint() is None and store.load_model() is None
        assert (store.dir / "trusted_key").exists() and (store.dir / "lock").exists()
    assert abs(restart_seq() - time.time() * 1000) < 5_000
