"""Helpers of the server tests: synthetic masked updates, an MQTT test hub, a server subprocess."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from fedhft.broker_server.metrics import parse_metrics
from fedhft.broker_server.state_dir import is_postgres
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, ModuleSpec
from fedhft.procs import stop_process
from fedhft.protocol import (
    AckMessage,
    HelloMessage,
    UpdateMessage,
    decode_ack,
    decode_model,
    encode_hello,
    encode_update,
    hello_topic,
    update_topic,
)
from fedhft.protocol.body import pack_body
from fedhft.protocol.encodings import encode_tensors
from fedhft.protocol.envelope import KIND_UPDATE, wrap
from fedhft.protocol.fields import UPDATE_FIELDS
from fedhft.protocol.mqtt import make_client
from fedhft.protocol.tensor_names import HEAD_BIAS, HEAD_WEIGHT, a_name, b_rows_name, is_rows_name, rows_name
from tests.support import ROOT
from tests.support.mosquitto import free_port
from tests.support.waiting import wait_until

SHA = "ab" * 32


def small_spec(
    num_layers: int = 2, hidden: int = 12, inter: int = 20, labels: int = 3, max_rank: int = 8
) -> GlobalSpec:
    """A GlobalSpec for pure tests: query/value/ffn_in per layer."""
    modules = {}
    for i in range(num_layers):
        for kind, (fin, fout) in {
            "query": (hidden, hidden),
            "value": (hidden, hidden),
            "ffn_in": (hidden, inter),
        }.items():
            name = f"layers.{i}.{kind}"
            modules[name] = ModuleSpec(name, fin, fout, max_rank)
    return GlobalSpec(
        modules=modules,
        head_shapes={HEAD_WEIGHT: (labels, hidden), HEAD_BIAS: (labels,)},
        num_labels=labels,
        lora_alpha=16.0,
        base_model_sha256="00" * 32,
    )


def plan_dict(layers: list[int], rank: int, targets: list[str], mask_ratio: float = 0.5) -> dict[str, Any]:
    """A LEGEND-style plan dict as devices send it in hellos."""
    return {
        "layers": [{"layer": i, "rank": rank, "targets": list(targets)} for i in layers],
        "mask_ratio": mask_ratio,
        "lora_alpha": 16.0,
    }


def update_tensors(
    rng: np.random.Generator,
    spec: GlobalSpec,
    plan: ClientPlan,
    scale: float = 0.1,
    head: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Random masked wire tensors of exactly the plan's shapes (rows = the mask ratio's share)."""
    out: dict[str, np.ndarray] = {}
    for name, r in plan.ranks.items():
        m = spec.modules[name]
        k = max(1, math.ceil(plan.mask_ratio * m.out_features))
        rows = np.sort(rng.choice(m.out_features, size=k, replace=False)).astype(np.int32)
        out[a_name(name)] = (scale * rng.standard_normal((r, m.in_features))).astype(np.float32)
        out[b_rows_name(name)] = (scale * rng.standard_normal((k, r))).astype(np.float32)
        out[rows_name(name)] = rows
    if head is None:
        head = {k: scale * rng.standard_normal(s) for k, s in spec.head_shapes.items()}
    out.update({k: np.asarray(v, dtype=np.float32) for k, v in head.items()})
    return out


def update_message(
    task: str,
    client_id: str,
    seq: int,
    tensors: dict[str, np.ndarray],
    base_version: int = 0,
    num_samples: int = 10,
    sha: str = SHA,
    profile: str = "tiny-test",
) -> UpdateMessage:
    return UpdateMessage(task, client_id, seq, base_version, num_samples, 0.5, {}, profile, sha, time.time(), tensors)


def encode_unchecked(msg: UpdateMessage) -> bytes:
    """Encode an update WITHOUT the encoder's checks (to build NaN payloads a real client never sends)."""
    header = {name: getattr(msg, name) for name in UPDATE_FIELDS}
    tensors = {k: (v.astype(np.int32) if is_rows_name(k) else v.astype(np.float32)) for k, v in msg.tensors.items()}
    stored, encodings = encode_tensors(tensors, "fp32")
    return wrap(KIND_UPDATE, pack_body(header, stored, encodings))


class Hub:
    """One test MQTT client: publishes for every synthetic device, collects every ack and model."""

    def __init__(self, port: int, task: str) -> None:
        self.task = task
        self.lock = threading.Lock()
        self.acks: dict[tuple[str, int], list[AckMessage]] = {}
        self.models: dict[str, list[bytes]] = {}
        self.client = make_client(f"test-hub-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"fedhft/v1/{task}/ack/+", 1), (f"fedhft/v1/{task}/model/#", 1)])
        assert subscribed.wait(10), "hub did not get its SUBACK"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if "/ack/" in msg.topic:
                ack = decode_ack(msg.payload, expected_task=self.task)
                self.acks.setdefault((ack.client_id, ack.seq), []).append(ack)
            else:
                self.models.setdefault(msg.topic, []).append(bytes(msg.payload))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def hello(self, client_id: str, plan: Mapping[str, Any], sha: str = SHA, profile: str = "tiny-test") -> None:
        msg = HelloMessage(self.task, client_id, profile, sha, dict(plan), time.time())
        self.publish(hello_topic(self.task, client_id), encode_hello(msg))

    def update(self, msg: UpdateMessage, encoding: str = "fp32") -> None:
        self.publish(update_topic(self.task, msg.client_id), encode_update(msg, encoding))

    def ack_status(self, client_id: str, seq: int) -> str | None:
        with self.lock:
            acks = self.acks.get((client_id, seq))
            return acks[-1].status if acks else None

    def latest_model(self, target: str) -> bytes | None:
        with self.lock:
            got = self.models.get(f"fedhft/v1/{self.task}/model/{target}")
            return got[-1] if got else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def db_rows(state: Path | str, sql: str) -> list[tuple]:
    """Rows of ``sql`` (no parameters) from a stopped server's state: its SQLite file, or its database."""
    if is_postgres(state):
        import psycopg

        with psycopg.connect(str(state)) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]  # type: ignore[arg-type]
    with sqlite3.connect(Path(state) / "state.sqlite3") as db:
        return db.execute(sql).fetchall()


class ServerProcess:
    """`python -m fedhft.cli server run ...` as a child; stderr goes to a log file."""

    def __init__(
        self, broker_url: str, task: str, state: Path | str, manifest: Path, *extra: str, log_dir: Path | None = None
    ) -> None:
        """``state``: a state dir or a postgresql:// URL (then give ``log_dir`` and ``--key-dir`` in ``extra``)."""
        self.metrics_port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "fedhft.cli",
            "-v",
            "server",
            "run",
            "--broker",
            broker_url,
            "--task",
            task,
            "--state",
            str(state),
            "--manifest",
            str(manifest),
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        ]
        self.log = (log_dir or Path(state).parent) / f"server-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if wait_ready:
            ok = wait_until(lambda: self.proc.poll() is not None or self.metric("fedhft_ready") == 1.0, timeout)
            assert ok and self.proc.poll() is None, f"server not ready: {self.log_text()[-3000:]}"
        return self

    def scrape(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            return {}

    def metric(self, key: str) -> float | None:
        return self.scrape().get(key)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.proc is None:
            return None
        return stop_process(self.proc, grace=10)


class ServerRunCapture:
    """`fedhft server run` through click with the Server replaced: each run records the ServerConfig it built."""

    def __init__(self, monkeypatch: Any, tmp_path: Path) -> None:
        from fedhft.broker_server import service
        from fedhft.broker_server.federation import Federation
        from fedhft.cli import server as cli_server

        self.configs: list[Any] = []
        capture = self

        class CapturingServer:
            def __init__(self, config: Any, stop: object = None) -> None:
                capture.configs.append(config)
                self.federation = Federation(small_spec(), config.federation)

            def run(self, stop: object) -> None:
                return None

        monkeypatch.setattr(service, "Server", CapturingServer)
        monkeypatch.setattr(cli_server, "stop_on_signals", contextlib.nullcontext)
        manifest = tmp_path / "manifest.json"
        manifest.write_text("{}")
        self.command = cli_server.server_run_command
        self.base_args = ["--broker", "mqtt://127.0.0.1:1", "--task", "t", "--state", str(tmp_path / "s")]
        self.base_args += ["--manifest", str(manifest)]

    def invoke(self, *extra: str) -> Any:
        """Run the command with the base arguments plus `extra`; the click result."""
        from click.testing import CliRunner

        return CliRunner().invoke(self.command, [*self.base_args, *extra])

    @property
    def config(self) -> Any:
        """The ServerConfig of the last successful run."""
        return self.configs[-1]


def version_of(hub: Hub, target: str) -> int | None:
    """The version of the newest model the hub received on ``target`` (None: none yet)."""
    payload = hub.latest_model(target)
    return None if payload is None else decode_model(payload).version


def update_payloads(
    task: str, spec: GlobalSpec, plan: ClientPlan, clients: list[str], rounds: int, seed: int
) -> dict[tuple[str, int], bytes]:
    """Encoded updates of seq 1..rounds for each client, in round order: {(client, seq): payload}."""
    rng = np.random.default_rng(seed)
    return {
        (cid, seq): encode_update(update_message(task, cid, seq, update_tensors(rng, spec, plan)))
        for seq in range(1, rounds + 1)
        for cid in clients
    }
