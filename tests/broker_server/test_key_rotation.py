"""Server key rotation: the key chain message, `fedhft server rotate-key` (crash-safe, refused while the
server runs), the edge's trusted key, and a device offline for two rotations catching up for real."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhft.broker_server.key_rotation import (
    CHAIN_NAME,
    NEXT_KEY_NAME,
    KeyRotationError,
    load_chain,
    load_server_key,
    read_chain,
    rotate_server_key,
)
from fedhft.broker_server.state_dir import StateLocked, lock_state_dir, unlock_state_dir
from fedhft.cli.server import server_rotate_key_command
from fedhft.edge_runtime.client import EdgeClient
from fedhft.edge_runtime.client_config import ClientConfig
from fedhft.edge_runtime.trust import TRUST_FILE, ServerTrust
from fedhft.protocol import (
    BadSignature,
    EncodingError,
    HeaderError,
    KeyChainMessage,
    ModelMessage,
    ProtocolError,
    WrongMessageKind,
    WrongTask,
    decode_key_chain,
    decode_model,
    encode_key_chain,
    encode_model,
    follow_chain,
    generate_keypair,
    key_id,
    key_topic,
    load_private_key,
    load_public_key,
    model_topic,
    public_key_to_hex,
    save_private_key,
)
from fedhft.protocol.envelope import FLAG_SIGNED, KIND_KEY, wrap
from fedhft.protocol.fields import json_dumps
from fedhft.protocol.keychain import KeyLink, extend_chain, genesis_link, link_statement, verify_links
from fedhft.protocol.mqtt import make_client
from fedhft.protocol.signing import sign
from tests.edge_runtime.test_local_train import write_csv
from tests.support.mosquitto import Mosquitto
from tests.support.server import ServerProcess, wait_until

TASK = "rot"


def chain_of(n: int) -> tuple[list, tuple[KeyLink, ...]]:
    """n private keys and the chain linking them in order."""
    keys = [generate_keypair()[0] for _ in range(n)]
    links: tuple[KeyLink, ...] = (genesis_link(keys[0], 1.0),)
    for i in range(1, n):
        links = extend_chain(links, keys[i - 1], keys[i].public_key(), 1.0 + i)
    return keys, links


def message(links: tuple[KeyLink, ...], task: str = TASK) -> KeyChainMessage:
    return KeyChainMessage(task, 10.0, links)


# ---------------------------------------------------------------------------------------------- key chain


def test_a_chain_round_trips_and_leads_from_any_of_its_keys_to_the_newest() -> None:
    keys, links = chain_of(3)
    msg = decode_key_chain(encode_key_chain(message(links), keys[2]), expected_task=TASK)
    assert msg.links == links
    for k in keys:
        assert follow_chain(msg, k.public_key()).public_key == public_key_to_hex(keys[2].public_key())
    with pytest.raises(BadSignature, match="does not contain the trusted key"):
        follow_chain(msg, generate_keypair()[1])  # another server's key, or one newer than the chain


def test_forged_tampered_unsigned_and_misaddressed_chains_are_refused() -> None:
    keys, links = chain_of(3)
    stranger, _ = generate_keypair()
    forged_link = KeyLink(3, public_key_to_hex(stranger.public_key()), 4.0, sign(b"anything", stranger).hex())
    forged = (*links, forged_link)
    with pytest.raises(BadSignature, match="link 3 is not signed by the key of link 2"):
        verify_links(forged)
    statement = link_statement(3, keys[2].public_key(), stranger.public_key(), 4.0)
    self_signed = (*links, KeyLink(3, forged_link.public_key, 4.0, sign(statement, stranger).hex()))
    with pytest.raises(BadSignature, match="link 3"):  # a new key may not vouch for itself
        verify_links(self_signed)
    good = encode_key_chain(message(links), keys[2])
    for at in (20, len(good) // 2, len(good) - 10):  # the body (zlib, JSON) or the signature
        tampered = bytearray(good)
        tampered[at] ^= 0x01
        with pytest.raises(ProtocolError):
            decode_key_chain(bytes(tampered))
    sig_tampered = bytearray(good)
    sig_tampered[-1] ^= 0x01
    with pytest.raises(BadSignature):
        decode_key_chain(bytes(sig_tampered))
    unsigned = bytearray(good[:-64])
    unsigned[6] &= ~FLAG_SIGNED
    with pytest.raises(BadSignature, match="not signed"):
        decode_key_chain(bytes(unsigned))
    old_signed = bytearray(good[:-64]) + sign(good[:-64], keys[1])  # envelope signed by a superseded key
    with pytest.raises(BadSignature, match="newest key"):
        decode_key_chain(bytes(old_signed))
    with pytest.raises(WrongTask):
        decode_key_chain(good, expected_task="another-task")
    with pytest.raises(WrongMessageKind):
        decode_model(good)
    bad_index = (links[0], KeyLink(5, links[1].public_key, links[1].created_at, links[1].signature))
    with pytest.raises(HeaderError, match="index"):
        verify_links(bad_index)
    with pytest.raises(EncodingError, match="newest key"):
        encode_key_chain(message(links), keys[0])


_KEYS, _LINKS = chain_of(2)
_GOOD = encode_key_chain(message(_LINKS), _KEYS[1])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=600) | st.builds(lambda i, b: _GOOD[:i] + b + _GOOD[i + len(b) :], st.integers(0, 400),
                                            st.binary(min_size=1, max_size=8)))  # fmt: skip
def test_any_bytes_decode_to_a_chain_or_a_protocol_error(payload: bytes) -> None:
    try:
        decode_key_chain(payload)
    except ProtocolError:
        pass


# ----------------------------------------------------------------------------------------- server rotation


def test_rotate_twice_then_the_chain_verifies_and_the_public_key_follows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    k0 = load_server_key(state)
    assert load_chain(state, k0)[-1].key_id == key_id(k0)
    runner = CliRunner()
    for _ in range(2):
        res = runner.invoke(server_rotate_key_command, ["--state", str(state)])
        assert res.exit_code == 0, res.output
        assert "server key rotated" in res.output
    chain = read_chain(state)
    assert chain is not None and len(chain) == 3 and chain[0].key_id == key_id(k0)
    k2 = load_server_key(state)
    assert chain[-1].key_id == key_id(k2) == key_id(load_public_key(state / "server_key.pub"))
    assert not (state / NEXT_KEY_NAME).exists()
    assert oct((state / "server_key.pem").stat().st_mode & 0o777) == "0o600"


def test_rotation_is_refused_while_the_server_holds_the_state_naming_its_pid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    load_server_key(state)
    fd = lock_state_dir(state)  # what a running server holds
    try:
        with pytest.raises(StateLocked, match=r"PID \d+"):
            rotate_server_key(state)
    finally:
        unlock_state_dir(fd)
    with pytest.raises(KeyRotationError, match="no server key"):
        rotate_server_key(tmp_path / "empty")


def test_an_interrupted_rotation_is_finished_or_dropped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    k0 = load_server_key(state)
    chain = load_chain(state, k0)
    new, new_pub = generate_keypair()
    save_private_key(state / NEXT_KEY_NAME, new)  # crash before the chain was written: dropped
    assert key_id(load_server_key(state)) == key_id(k0) and not (state / NEXT_KEY_NAME).exists()
    save_private_key(state / NEXT_KEY_NAME, new)  # crash after the chain (the commit): finished
    longer = extend_chain(chain, k0, new_pub, 5.0)
    (state / CHAIN_NAME).write_text(json.dumps({"format": 1, "links": [asdict(x) for x in longer]}))
    assert key_id(load_server_key(state)) == key_id(new)
    assert key_id(load_public_key(state / "server_key.pub")) == key_id(new)
    assert len(load_chain(state, new)) == 2


# ------------------------------------------------------------------------------------------- edge trust


def test_the_edge_adopts_the_newest_key_persists_it_and_restarts_from_it(tmp_path: Path) -> None:
    keys, links = chain_of(3)
    trust = ServerTrust(tmp_path, keys[0].public_key())
    assert trust.consider(encode_key_chain(message(links[:1]), keys[0]), TASK) is None  # nothing new
    adopted = trust.consider(encode_key_chain(message(links), keys[2]), TASK)
    assert adopted is not None and adopted.index == 2 and key_id(trust.key) == key_id(keys[2])
    saved = json.loads((tmp_path / TRUST_FILE).read_text())
    assert saved["key_id"] == key_id(keys[2]) and saved["previous_key_id"] == key_id(keys[0])
    assert key_id(ServerTrust(tmp_path, keys[0].public_key()).key) == key_id(keys[2])  # after a restart
    with pytest.raises(BadSignature):  # an older chain (without the key now trusted) is refused
        trust.consider(encode_key_chain(message(links[:2]), keys[1]), TASK)
    other, _ = generate_keypair()  # re-provisioned with another server key: start from that one
    assert key_id(ServerTrust(tmp_path, other.public_key()).key) == key_id(other)


# ------------------------------------------------------------------------------------------ end to end


class Publisher:
    """An anonymous test client on the plain test broker: publishes forged messages."""

    def __init__(self, port: int) -> None:
        self.c = make_client()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_an_edge_offline_for_two_rotations_catches_up_and_refuses_the_old_key(
    tiny_export: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    state = tmp_path / "server-state"
    server = ServerProcess(mosquitto.url, TASK, state, tiny_export, "--buffer-size", "1").start()
    level = [100.0]
    cfg = ClientConfig(
        artifacts=tiny_export,
        data=write_csv(tmp_path / "local.csv", 24),
        broker=mosquitto.url,
        task=TASK,
        client_id="c1",
        state_dir=tmp_path / "edge",
        server_key=tmp_path / "provisioned.pub",
        local_steps=3,
        rounds=1,
        battery_min_percent=50,
        battery_check_seconds=0.1,
        backoff_base=0.2,
        backoff_cap=1.0,
    )
    shutil.copyfile(state / "server_key.pub", cfg.server_key)
    try:
        first = EdgeClient(cfg, battery=lambda: level[0]).run(timeout=40)  # one round with key 0
        assert first.acked == {0: "accepted"} and first.adopted_keys == []
        k0 = load_private_key(state / "server_key.pem")
        assert server.stop() == 0
        for _ in range(2):  # the device is offline
            assert CliRunner().invoke(server_rotate_key_command, ["--state", str(state)]).exit_code == 0
        k2 = load_private_key(state / "server_key.pem")
        server = ServerProcess(mosquitto.url, TASK, state, tiny_export, "--buffer-size", "1").start()
        # the device comes back once the server has published (retained) the new chain and re-signed its models
        assert wait_until(lambda: decode_model(_retained(mosquitto.port, model_topic(TASK, "client/c1"))).key_id
                          == key_id(k2), 20)  # fmt: skip

        level[0] = 10.0  # no training until the checks below are done
        client = EdgeClient(replace(cfg, rounds=0), battery=lambda: level[0])
        assert key_id(client.server_key) == key_id(k0)
        stop = threading.Event()
        thread = threading.Thread(target=client.run, args=(stop, 60))
        thread.start()
        try:
            s = client.summary
            assert wait_until(lambda: s.adopted_keys == [key_id(k2)], 20), s
            saved = json.loads((cfg.state_dir / TRUST_FILE).read_text())
            assert saved["key_id"] == key_id(k2) and saved["index"] == 2
            pub = Publisher(mosquitto.port)
            try:
                spec_model = decode_model(_retained(mosquitto.port, model_topic(TASK, "client/c1")))
                old = ModelMessage(TASK, 1000, "client/c1", time.time(), "", {}, spec_model.tensors)
                assert s.refused_models == []  # the retained chain came first: no model was refused
                pub.publish(model_topic(TASK, "client/c1"), encode_model(old, k0))
                assert wait_until(lambda: len(s.refused_models) == 1, 10), s
                assert s.refused_models[0].startswith("BadSignature") and "does not verify" in s.refused_models[0]
                stranger, _ = generate_keypair()
                chain = read_chain(state)
                assert chain is not None
                forged_link = KeyLink(3, public_key_to_hex(stranger.public_key()), time.time(), "ab" * 64)
                forged = encode_key_chain_unchecked(message((*chain, forged_link)), stranger)
                pub.publish(key_topic(TASK), forged)
                assert wait_until(lambda: len(s.refused_key_chains) == 1, 10), s
                assert "link 3" in s.refused_key_chains[0] and key_id(client.server_key) == key_id(k2)
            finally:
                pub.close()
            level[0] = 100.0  # train: the server's next model is signed by key 2 and accepted
            assert wait_until(lambda: (client.state.model_version or 0) >= 2, 30), s
            level[0] = 10.0
        finally:
            stop.set()
            thread.join(20)
        assert not thread.is_alive()
        assert s.adopted_keys == [key_id(k2)] and len(s.refused_key_chains) == 1
    finally:
        server.stop()


def encode_key_chain_unchecked(msg: KeyChainMessage, key: object) -> bytes:
    """A key message as a forger would build it (encode_key_chain refuses to sign a broken chain)."""
    body = {
        "task": msg.task,
        "created_at": msg.created_at,
        "links": [asdict(link) for link in msg.links],
    }
    return wrap(KIND_KEY, json_dumps(body, "key chain").encode(), key)  # type: ignore[arg-type]


def _retained(port: int, topic: str) -> bytes:
    """The retained message on ``topic``."""
    got: list[bytes] = []
    c = make_client()
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe(topic, 1)
        assert wait_until(lambda: bool(got), 10), f"nothing retained on {topic}"
        return got[-1]
    finally:
        c.disconnect()
        c.loop_stop()


# ------------------------------------------------------------------------------------ PostgreSQL state


def test_a_database_state_keeps_its_key_in_key_dir_and_its_public_chain_in_the_database(
    postgres_url: str, tmp_path: Path
) -> None:
    from fedhft.broker_server.state_backend import open_state
    from fedhft.broker_server.state_dir import StateError
    from fedhft.cli.server import server_init_command

    fingerprint = "f" * 64
    with pytest.raises(StateError, match="needs --key-dir"):
        open_state(postgres_url, "task", fingerprint)
    for command in (server_init_command, server_rotate_key_command):  # they work on the key dir, not the URL
        res = CliRunner().invoke(command, ["--state", postgres_url])
        assert res.exit_code != 0 and "keeps no key files" in str(res.exception)

    def serve(key_dir: Path) -> list[str]:
        store = open_state(postgres_url, "task", fingerprint, key_dir)
        try:
            store.key_chain(store.signing_key())
            return [r[0] for r in store.db.execute("SELECT public_key FROM server_keys ORDER BY idx").fetchall()]  # type: ignore[attr-defined]
        finally:
            store.close()

    keys = tmp_path / "keys"
    first = serve(keys)
    assert first == [public_key_to_hex(load_server_key(keys).public_key())]
    store = open_state(postgres_url, "task", fingerprint, keys)
    try:
        with pytest.raises(StateLocked):  # the running server holds its key dir: no rotation meanwhile
            rotate_server_key(keys)
    finally:
        store.close()
    rotate_server_key(keys)
    assert serve(keys)[:1] == first and len(serve(keys)) == 2  # the rotated chain is copied in
    with pytest.raises(KeyRotationError, match="another server key chain"):
        serve(tmp_path / "other-keys")  # a fresh key dir: not the key this database was served with
