"""Durable device state: atomic files, the lock, the bounded outbox, backoff, broker URLs, battery."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from fedhft.edge_runtime.battery import read_battery_percent
from fedhft.edge_runtime.mqtt_link import backoff_delay
from fedhft.edge_runtime.outbox import Outbox
from fedhft.edge_runtime.state import EdgeState, StateError, StateStore, write_atomic, write_atomic_with
from fedhft.protocol.mqtt import LinkError, parse_broker_url

SHA = "a" * 64


def test_state_round_trips_and_checks_its_owner(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s") as store:
        st = store.load("task", "c1", SHA)
        assert st.next_seq == 0 and st.model_version is None and not st.needs_training()
        st.next_seq, st.model_version, st.trained_version, st.cluster = 3, 7, 6, 2
        store.save(st)
        assert st.needs_training()
        store.save_model(b"model-bytes")
    with StateStore(tmp_path / "s") as store:
        back = store.load("task", "c1", SHA)
        assert (back.next_seq, back.model_version, back.trained_version, back.cluster) == (3, 7, 6, 2)
        assert store.load_model() == b"model-bytes"
        with pytest.raises(StateError, match="belongs to task 'task', client 'c1'"):
            store.load("task", "c2", SHA)
        with pytest.raises(StateError, match="belongs to"):
            store.load("task", "c1", "b" * 64)


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{not json")
    with StateStore(tmp_path / "s") as store, pytest.raises(StateError, match="unreadable state"):
        store.load("t", "c", SHA)


def test_one_client_per_state_directory(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "s")
    try:
        with pytest.raises(StateError, match="in use by another running client"):
            StateStore(tmp_path / "s")
    finally:
        first.close()
    StateStore(tmp_path / "s").close()  # free again once closed


def test_atomic_write_replaces_whole_files_and_cleans_failed_temps(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    write_atomic(p, b"old")
    write_atomic(p, b"new")
    assert p.read_bytes() == b"new"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic_with(p, broken)
    assert p.read_bytes() == b"new"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_stale_temp_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".state.json.x1.tmp").write_text("torn")
    (tmp_path / "s" / "outbox").mkdir()
    (tmp_path / "s" / "outbox" / ".00000000000000000001.update.x2.tmp").write_bytes(b"torn")
    with StateStore(tmp_path / "s") as store:
        assert not (tmp_path / "s" / ".state.json.x1.tmp").exists()
        box = Outbox(store.outbox_dir)
        assert len(box) == 0 and not list(store.outbox_dir.glob(".*"))


def test_outbox_is_ordered_durable_and_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(tmp_path / "o", limit=3)
    for seq in (5, 3, 4):
        assert box.put(seq, f"u{seq}".encode()) == []
    assert box.seqs() == [3, 4, 5] and 4 in box and 9 not in box
    assert [(s, p) for s, p in box.items()] == [(3, b"u3"), (4, b"u4"), (5, b"u5")]
    with caplog.at_level(logging.WARNING):
        assert box.put(6, b"u6") == [3]
    assert "outbox full" in caplog.text
    assert Outbox(tmp_path / "o", limit=3).seqs() == [4, 5, 6]  # a new process sees the same queue
    assert box.remove(4) and not box.remove(4)
    assert box.get(5) == b"u5" and len(box) == 2
    with pytest.raises(StateError):
        Outbox(tmp_path / "o2", limit=0)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(0)
    for attempt in range(12):
        d = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in delays)
        assert len({round(x, 6) for x in delays}) > 40  # jittered, not one fixed value
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884") == parse_broker_url("tcp://127.0.0.1:1884")
    a = parse_broker_url("mqtt://broker.local")
    assert (a.host, a.port, a.tls) == ("broker.local", 1883, False)
    b = parse_broker_url("mqtts://broker.local")
    assert (b.port, b.tls) == (8883, True)
    for bad in ("http://x:1", "broker:1883", "mqtt://:1883", "mqtt://x:notaport"):
        with pytest.raises(LinkError):
            parse_broker_url(bad)


def test_battery_reader_takes_the_lowest_battery_and_ignores_mains(tmp_path: Path) -> None:
    assert read_battery_percent(tmp_path / "none") is None
    for name, kind, cap in (("AC", "Mains", None), ("BAT0", "Battery", "81"), ("BAT1", "Battery", "17")):
        d = tmp_path / name
        d.mkdir()
        (d / "type").write_text(kind + "\n")
        if cap is not None:
            (d / "capacity").write_text(cap + "\n")
    assert read_battery_percent(tmp_path) == 17.0


def test_needs_training_follows_the_versions() -> None:
    st = EdgeState("t", "c", SHA)
    assert not st.needs_training()
    st.model_version = 0
    assert st.needs_training()
    st.trained_version = 0
    assert not st.needs_training()
