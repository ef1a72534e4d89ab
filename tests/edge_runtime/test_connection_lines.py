"""`fedhft edge run` at default verbosity: one line per connection state change, and one line + exit 1 when the
broker refuses the credentials. The CLI runs as a subprocess (as a user starts it) against real Mosquittos."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.edge_runtime.test_local_train import write_csv
from tests.support import ROOT
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.tls_broker import tls_lab

TASK = "lines"


class EdgeProcess:
    """`python -m fedhft.cli edge run ...` with its stderr read line by line in a thread."""

    def __init__(self, export: Path, tmp: Path, broker: str, *extra: str) -> None:
        key = tmp / "server.pub"
        key.write_text("11" * 32 + "\n")
        args = [sys.executable, "-m", "fedhft.cli", "edge", "run", "--artifacts", str(export)]
        args += ["--data", str(write_csv(tmp / "d.csv", 12)), "--broker", broker, "--task", TASK]
        args += ["--client-id", "dev-a", "--state-dir", str(tmp / "state"), "--server-key", str(key), *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout} s; got {self.lines}")

    def finish(self, timeout: float = 30.0) -> int:
        """SIGTERM (unless it has exited) and wait; every stderr line is in ``lines`` afterwards."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self._q.empty():
            self.lines.append(self._q.get())
        return rc


def test_an_unreachable_broker_is_one_line_not_silence(tiny_export: Path, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    edge = EdgeProcess(tiny_export, tmp_path, f"mqtt://127.0.0.1:{port}")
    try:
        line = edge.wait_line("cannot reach")
        assert line.startswith(f"cannot reach 127.0.0.1:{port}: Connection refused, retrying in "), line
        assert line.endswith(" s")
        time.sleep(2.5)  # several more refused attempts: the same state, no new line
    finally:
        edge.finish()
    assert edge.lines == [line], edge.lines


def test_a_mistyped_host_names_the_host(tiny_export: Path, tmp_path: Path) -> None:
    edge = EdgeProcess(tiny_export, tmp_path, "mqtt://no-such-host.invalid:1883")
    try:
        line = edge.wait_line("cannot reach")
    finally:
        edge.finish()
    assert line.startswith("cannot reach no-such-host.invalid:1883: "), line
    assert "retrying in" in line and "Traceback" not in "\n".join(edge.lines)


def test_connected_lost_and_connected_again(tiny_export: Path, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    edge = EdgeProcess(tiny_export, tmp_path, broker.url)
    try:
        assert edge.wait_line("connected") == f"connected to 127.0.0.1:{broker.port}"
        broker.stop()
        lost = edge.wait_line("lost the connection")
        assert lost.startswith(f"lost the connection to 127.0.0.1:{broker.port}: ") and "retrying in" in lost
        broker.start()
        assert edge.wait_line("connected") == f"connected to 127.0.0.1:{broker.port}"
    finally:
        rc = edge.finish()
        broker.stop()
    assert rc == 0
    # between the two connections at most one "cannot reach" line (the same refusal is not a new state)
    assert len([x for x in edge.lines if x.startswith("cannot reach")]) <= 1, edge.lines
    assert not [x for x in edge.lines if " warning " in x or "Traceback" in x], edge.lines


def test_refused_credentials_are_one_line_and_exit_1(tiny_export: Path, tmp_path: Path) -> None:
    with tls_lab({TASK: ("srv", ["dev-a"])}) as lab:
        ca = ["--tls-ca", lab.tls.cafile, "--username"]
        for user, password in (("dev-a", "wrong-password"), ("nobody", "x")):
            run = tmp_path / user
            run.mkdir()
            edge = EdgeProcess(tiny_export, run, lab.url, *ca, user, "--password", password)
            try:
                edge.proc.wait(60)
            finally:
                rc = edge.finish()
            assert rc == 1, edge.lines
            assert len(edge.lines) == 1, edge.lines
            assert edge.lines[0].startswith(f"error: the broker at 127.0.0.1:{lab.port} refused the connection ("), (
                edge.lines
            )
            assert "check --username and --password" in edge.lines[0]
        good = tmp_path / "good"
        good.mkdir()
        edge = EdgeProcess(tiny_export, good, lab.url, *ca, "dev-a", "--password", lab.password("dev-a"))
        try:
            assert edge.wait_line("connected") == f"connected to 127.0.0.1:{lab.port}"
        finally:
            assert edge.finish() == 0
