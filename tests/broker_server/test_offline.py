"""The server's message handling without a broker: verdicts, replays, durability order, restart, disk full."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server import state_store
from fedhft.broker_server.federation import FederationConfig
from fedhft.broker_server.ingest import Inbound
from fedhft.broker_server.service import Server, ServerConfig
from fedhft.broker_server.state_dir import is_postgres
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, delta_norm
from fedhft.protocol import HelloMessage, encode_hello, encode_update, hello_topic, model_topic, update_topic
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.tensor_names import a_name, b_rows_name
from tests.support.server import SHA, encode_unchecked, update_message, update_tensors

TASK = "offline"
Ack = tuple[str, int, str, str]


@pytest.fixture
def make_server(
    tiny_export: Path, tmp_path: Path, state_spec: str | Path
) -> Iterator[Callable[..., tuple[Server, list[Ack]]]]:
    """Servers on one state (each backend in turn: conftest's state_spec)."""
    servers: list[Server] = []

    def make(clip_norm: float | None = None, **fed: object) -> tuple[Server, list[Ack]]:
        config = ServerConfig(
            broker="mqtt://127.0.0.1:1",
            task=TASK,
            state_dir=state_spec,
            key_dir=tmp_path / "keys" if is_postgres(state_spec) else None,
            manifest=tiny_export,
            federation=FederationConfig(**{"buffer_size": 100, "window_seconds": 1e6, **fed}),
            clip_norm=clip_norm,
        )
        server = Server(config)
        acks: list[Ack] = []
        server.ingest.send_ack = lambda cid, seq, status, reason: acks.append((cid, seq, status, reason))  # type: ignore[method-assign]
        servers.append(server)
        return server, acks

    yield make
    for s in servers:
        s.shutdown()


@pytest.fixture
def tiny(tiny_export: Path) -> tuple[GlobalSpec, dict, ClientPlan]:
    manifest = load_manifest(tiny_export)
    spec = GlobalSpec.from_manifest(manifest)
    return spec, dict(manifest.plan), ClientPlan.from_plan(manifest.plan, spec)


def hello(cid: str, plan: dict) -> Inbound:
    payload = encode_hello(HelloMessage(TASK, cid, "tiny-test", SHA, plan, time.time()))
    return Inbound(hello_topic(TASK, cid), payload, 0, 0, time.time())


def upd(cid: str, payload: bytes, topic_client: str | None = None) -> Inbound:
    return Inbound(update_topic(TASK, topic_client or cid), payload, 0, 0, time.time())


def good(tiny: tuple, cid: str, seq: int, rng: np.random.Generator, base: int = 0, **kw: object) -> bytes:
    spec, _, plan = tiny
    return encode_update(update_message(TASK, cid, seq, update_tensors(rng, spec, plan), base_version=base, **kw))


def query(server: Server, sql: str) -> list[tuple]:
    """Rows of ``sql`` (no parameters: the same text on both backends) from the server's own connection."""
    return [tuple(r) for r in server.store.db.execute(sql).fetchall()]  # type: ignore[attr-defined]


def statuses(server: Server) -> list[tuple]:
    return query(server, "SELECT client_id, seq, status FROM updates ORDER BY id")


def test_replays_get_duplicate_acks_and_are_aggregated_once(make_server: Callable, tiny: tuple) -> None:
    rng = np.random.default_rng(0)
    server, acks = make_server()
    server.handle_batch([hello("a", tiny[1])])
    p1 = good(tiny, "a", 1, rng)
    p2 = good(tiny, "a", 2, rng)
    server.handle_batch([upd("a", p1)])
    server.handle_batch([upd("a", p1), upd("a", good(tiny, "a", 0, rng)), upd("a", p2), upd("a", p2)])
    assert [a[1:3] for a in acks] == [
        (1, "accepted"),
        (1, "duplicate"),
        (0, "accepted"),  # an older seq never stored (lost in flight, sent again late) is still new work
        (2, "accepted"),
        (2, "duplicate"),
    ]
    assert statuses(server) == [("a", 1, "pending"), ("a", 0, "pending"), ("a", 2, "pending")]
    assert server.aggregate_and_publish()
    assert server.federation.version == 1
    assert statuses(server) == [("a", 1, "aggregated"), ("a", 0, "aggregated"), ("a", 2, "aggregated")]
    server.handle_batch([upd("a", good(tiny, "a", 0, rng))])
    assert acks[-1][1:3] == (0, "duplicate")  # once stored, a replay of it is acknowledged, not taken again
    server.handle_batch([upd("a", p1)])
    assert acks[-1][1:3] == (1, "duplicate") and not server.federation.pending
    server.handle_batch([upd("ghost", good(tiny, "ghost", 1, rng))])
    assert acks[-1][1:4] == (1, "rejected", "unknown_client: no hello from this client")
    versions = query(server, "SELECT version, num_updates FROM versions")
    assert versions == [(1, 3)]
    m = server.metrics
    assert m.get("fedhft_updates_total", {"status": "duplicate", "reason": "replay"}) == 4
    assert m.get("fedhft_updates_total", {"status": "accepted", "reason": ""}) == 3


def test_restart_resumes_pending_updates_seqs_and_versions(make_server: Callable, tiny: tuple) -> None:
    rng = np.random.default_rng(1)
    server, acks = make_server()
    server.handle_batch([hello("a", tiny[1]), hello("b", tiny[1])])
    server.handle_batch([upd("a", good(tiny, "a", s, rng)) for s in (1, 2)] + [upd("b", good(tiny, "b", 1, rng))])
    server.aggregate_and_publish()
    p3 = good(tiny, "a", 3, rng, base=1)
    server.handle_batch([upd("a", p3)])
    state_before = server.federation.states[0].copy()
    m0 = next(iter(tiny[2].ranks))
    server.shutdown()  # as after kill -9: nothing is flushed on the way out

    server, acks = make_server()
    assert server.federation.version == 1 and [p.seq for p in server.federation.pending] == [3]
    np.testing.assert_array_equal(server.federation.states[0].modules[m0], state_before.modules[m0])
    server.handle_batch([upd("a", p3), upd("a", good(tiny, "a", 4, rng, base=1))])
    assert [a[1:3] for a in acks] == [(3, "duplicate"), (4, "accepted")]
    server.aggregate_and_publish()
    rows = query(server, "SELECT version, num_updates FROM versions ORDER BY version")
    assert rows == [(1, 3), (2, 2)]
    aggregated = query(server, "SELECT COUNT(*) FROM updates WHERE status = 'aggregated'")[0][0]
    assert aggregated == sum(n for _, n in rows)


def test_an_update_is_acked_only_after_it_is_durable(
    make_server: Callable, tiny: tuple, state_spec: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that fails (a full disk under SQLite; under PostgreSQL a constraint every insert breaks, added
    from another connection) acknowledges nothing; the device's resend is taken once the store works again."""
    rng = np.random.default_rng(2)
    server, acks = make_server()
    server.handle_batch([hello("a", tiny[1])])
    p1 = good(tiny, "a", 1, rng)
    if is_postgres(state_spec):
        import psycopg

        with psycopg.connect(str(state_spec), autocommit=True) as other:
            other.execute("ALTER TABLE updates ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
            server.handle_batch([upd("a", p1)])
            other.execute("ALTER TABLE updates DROP CONSTRAINT refuse_all")
        reason = "storage"
    else:

        def full(_fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(state_store.os, "fsync", full)
        server.handle_batch([upd("a", p1)])
        monkeypatch.undo()
        reason = "disk_full"
    assert acks == [] and statuses(server) == [] and not server.federation.pending
    assert server.metrics.get("fedhft_updates_total", {"status": "error", "reason": reason}) == 1
    server.handle_batch([upd("a", p1)])  # the device retries after its ack timeout
    assert acks == [("a", 1, "accepted", "")]


def test_bad_updates_are_rejected_with_their_reason(make_server: Callable, tiny: tuple) -> None:
    spec, plan_json, plan = tiny
    rng = np.random.default_rng(3)
    server, acks = make_server(max_staleness=2)
    server.handle_batch([hello("a", plan_json)])
    nan = update_tensors(rng, spec, plan)
    m0, r0 = next(iter(plan.ranks.items()))
    nan[a_name(m0)][0, 0] = np.nan
    wrong = update_tensors(rng, spec, plan)
    wrong[a_name(m0)] = wrong[a_name(m0)][: r0 - 1]  # one rank short of the plan
    wrong[b_rows_name(m0)] = wrong[b_rows_name(m0)][:, : r0 - 1]
    big = update_tensors(rng, spec, plan) | {
        "layers.9.query.A": np.zeros((16, 40000), np.float32),
        "layers.9.query.B_rows": np.zeros((1, 16), np.float32),
        "layers.9.query.rows": np.zeros(1, np.int32),
    }
    cases = {
        1: ("non_finite", encode_unchecked(update_message(TASK, "a", 1, nan))),
        2: ("wrong_shape", encode_update(update_message(TASK, "a", 2, wrong))),
        3: ("too_large", encode_update(update_message(TASK, "a", 3, big), "fp32")),
        4: ("manifest_mismatch", good(tiny, "a", 4, rng, sha="cd" * 32)),
        5: ("future_version", good(tiny, "a", 5, rng, base=7)),
    }
    server.handle_batch([upd("a", payload) for _, payload in cases.values()])
    server.handle_batch([upd("b", good(tiny, "b", 6, rng), topic_client="a")])  # b's update on a's topic
    server.handle_batch([upd("a", b"FHFT garbage")])  # cannot be read: counted, not acked
    got = {seq: (status, reason.split(":")[0]) for _, seq, status, reason in acks}
    assert got == {seq: ("rejected", reason) for seq, (reason, _) in cases.items()} | {6: ("rejected", "misaddressed")}
    assert statuses(server) == [] and not server.federation.pending
    for reason in ("non_finite", "wrong_shape", "too_large", "manifest_mismatch", "misaddressed", "malformed"):
        assert server.metrics.get("fedhft_updates_total", {"status": "rejected", "reason": reason}) == 1
    server.handle_batch([upd("a", good(tiny, "a", 1, rng))])  # a fixed resend of a rejected seq is fine
    assert acks[-1][1:3] == (1, "accepted")


def test_stale_updates_are_rejected(make_server: Callable, tiny: tuple) -> None:
    rng = np.random.default_rng(4)
    server, acks = make_server(max_staleness=1, buffer_size=1)
    server.handle_batch([hello("a", tiny[1])])
    for seq in (1, 2, 3):
        server.handle_batch([upd("a", good(tiny, "a", seq, rng, base=server.federation.version))])
        server.aggregate_and_publish()
    server.handle_batch([upd("a", good(tiny, "a", 4, rng, base=1))])
    assert server.federation.version == 3 and acks[-1][2:] == ("rejected", acks[-1][3])
    assert acks[-1][3].startswith("stale")


def test_oversized_norms_are_clipped_and_counted(make_server: Callable, tiny: tuple) -> None:
    spec, _, plan = tiny
    rng = np.random.default_rng(5)
    server, acks = make_server(clip_norm=0.5)
    server.handle_batch([hello("a", tiny[1])])
    tensors = update_tensors(rng, spec, plan, scale=1.0)
    assert delta_norm(tensors) > 0.5
    server.handle_batch([upd("a", encode_update(update_message(TASK, "a", 1, tensors), "fp32"))])
    assert acks == [("a", 1, "accepted", "")]
    assert server.metrics.get("fedhft_updates_clipped_total", {"bound": "clip_norm"}) == 1
    (stored,) = server.store.load_pending()
    assert stored.clip_scale < 1
    assert delta_norm(server.federation.pending[0].tensors) == pytest.approx(0.5, rel=1e-4)
    server.shutdown()
    server, _ = make_server(clip_norm=0.5)  # after a restart the stored payload is clipped the same way
    assert delta_norm(server.federation.pending[0].tensors) == pytest.approx(0.5, rel=1e-4)


def test_a_run_of_hellos_is_one_commit_before_any_model_or_puback_and_a_bad_one_is_refused_alone(
    make_server: Callable, tiny: tuple, state_spec: str | Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = make_server()
    events: list[str] = []
    store, out = server.store, server.out
    if is_postgres(state_spec):  # every write transaction of either backend goes through one method
        run = store._run  # type: ignore[attr-defined]

        def counted_run(what: str, work: Callable, transaction: bool = True) -> object:
            result = run(what, work, transaction)
            events.append("commit" if transaction else "read")
            return result

        store._run = counted_run  # type: ignore[attr-defined]
    else:
        transaction = store.transaction  # type: ignore[attr-defined]

        @contextlib.contextmanager
        def counted_transaction() -> Iterator[object]:
            with transaction() as db:
                yield db
            events.append("commit")

        store.transaction = counted_transaction  # type: ignore[attr-defined]
    out.publish = lambda topic, payload, retain=False: events.append(f"publish {topic}")  # type: ignore[method-assign]
    out.ack = lambda mid, qos: events.append(f"puback {mid}")  # type: ignore[method-assign]
    batch = [hello(f"d{i}", tiny[1]) for i in range(5)]
    bad = Inbound(hello_topic(TASK, "broken"), b"not a hello", 0, 0, time.time())
    batch.insert(2, bad)
    for i, msg in enumerate(batch):
        msg.mid = i + 1
    with caplog.at_level(logging.WARNING, logger="fedhft.server"):
        server.handle_batch(batch)
    assert events.count("commit") == 1 and events[0] == "commit"  # one transaction, before any model or PUBACK
    assert sorted(e for e in events if e.startswith("publish")) == sorted(
        f"publish {model_topic(TASK, f'client/d{i}')}" for i in range(5)
    )
    assert [e for e in events if e.startswith("puback")] == [f"puback {i}" for i in range(1, 7)]
    rejected = [r.fields for r in caplog.records if r.getMessage() == "hello rejected"]  # type: ignore[attr-defined]
    assert len(rejected) == 1 and rejected[0]["client"] == "broken"
    assert server.metrics.get("fedhft_hellos_total", {"status": "accepted", "reason": ""}) == 5
    assert sorted(server.ingest.registry) == [f"d{i}" for i in range(5)]
    server.handle_batch([hello(f"d{i}", tiny[1]) for i in range(5)])  # said again, unchanged: nothing to store
    assert events.count("commit") == 1
    server.shutdown()  # as after kill -9: what was acknowledged is in the state

    server, _ = make_server()
    assert sorted(server.ingest.registry) == [f"d{i}" for i in range(5)]
    assert sorted(r[0] for r in query(server, "SELECT client_id FROM clients")) == [f"d{i}" for i in range(5)]


def test_hellos_that_could_not_be_stored_are_not_registered_and_unchanged_ones_stand(
    make_server: Callable, tiny: tuple, state_spec: str | Path
) -> None:
    server, _ = make_server()
    server.handle_batch([hello("old", tiny[1])])
    published: list[str] = []
    server.out.publish = lambda topic, payload, retain=False: published.append(topic)  # type: ignore[method-assign]
    batch = [hello("old", tiny[1]), hello("new1", tiny[1]), hello("new2", tiny[1])]
    if is_postgres(state_spec):
        import psycopg

        with psycopg.connect(str(state_spec), autocommit=True) as other:
            other.execute("ALTER TABLE clients ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
            server.handle_batch(batch)
            other.execute("ALTER TABLE clients DROP CONSTRAINT refuse_all")
    else:
        db = server.store.db  # type: ignore[attr-defined]
        db.execute("CREATE TRIGGER refuse_all BEFORE INSERT ON clients BEGIN SELECT RAISE(ABORT, 'refused'); END")
        server.handle_batch(batch)
        db.execute("DROP TRIGGER refuse_all")
    assert sorted(server.ingest.registry) == ["old"] and published == []
    m = server.metrics
    assert m.get("fedhft_hellos_total", {"status": "error", "reason": "storage"}) == 2
    assert m.get("fedhft_hellos_total", {"status": "accepted", "reason": ""}) == 2  # "old": its first and again
    server.handle_batch(batch[1:])  # the devices say hello again
    assert sorted(server.ingest.registry) == ["new1", "new2", "old"] and len(published) == 2
