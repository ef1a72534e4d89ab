"""An embedded MQTT v5 broker for demos and tests (`fedhft broker run`), run as a child process.

The broker must speak MQTT v5 with shared subscriptions and carry multi-MB payloads. The choice, in order:

1. **Mosquitto** when installed (Debian/Ubuntu ``mosquitto``; verified: v5, ``$share`` subscriptions,
   payloads up to 100 MB). It runs as a child, ``mosquitto -c <generated conf>`` in the foreground, and is
   stopped by its PID on exit.
2. **iotcore** (PyPI, MIT; the Rust broker rumqttd compiled into a wheel) otherwise: verified here with
   iotcore 0.4.0 (v5 listener, shared subscriptions split 10/10, a 3 MB payload), but only with a TOML
   config that declares a ``[v5.1]`` listener and raises ``max_payload_size`` (the default is 20 KB).
   It also runs in a child process (``iotcore.Broker``). rumqttd keys a shared subscription by its share
   name alone (a second filter under the same name is silently dropped), so the server uses one share
   name per filter (``<group>.update``, ``<group>.hello``), which Mosquitto handles the same way.

Pure-Python brokers were ruled out: amqtt speaks MQTT 3.1.1 only and drops ``$share`` subscriptions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedhft.broker_server.broker.errors import BrokerError
from fedhft.broker_server.broker.mosquitto_config import MAX_MESSAGE_BYTES, embedded_mosquitto_config
from fedhft.logs import event
from fedhft.procs import stop_process

log = logging.getLogger("fedhft.broker")


def find_mosquitto() -> str | None:
    """Path of the mosquitto executable, or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def iotcore_available() -> bool:
    return importlib.util.find_spec("iotcore") is not None


def iotcore_config(port: int, bind: str, max_payload: int = MAX_MESSAGE_BYTES) -> str:
    """A rumqttd TOML config (for iotcore) with one MQTT v5 listener and a raised payload limit."""
    return (
        "id = 0\n\n[router]\nid = 0\nmax_connections = 10010\nmax_outgoing_packet_count = 200\n"
        f"max_segment_size = {4 * max_payload}\nmax_segment_count = 10\n\n"
        f'[v5.1]\nname = "v5-1"\nlisten = "{bind}:{port}"\nnext_connection_delay_ms = 1\n'
        "    [v5.1.connections]\n    connection_timeout_ms = 60000\n"
        f"    max_payload_size = {max_payload}\n    max_inflight_count = 100\n"
    )


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """True once host:port accepts TCP connections (False after ``timeout`` or when ``alive()`` is False)."""
    deadline = time.monotonic() + timeout
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((target, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A broker child process on ``bind:port``; ``start()``, then ``stop()`` (by PID) or use as a context."""

    port: int = 1883
    bind: str = "127.0.0.1"
    backend: str = "auto"  # auto | mosquitto | iotcore
    persistent: bool = False  # mosquitto only: keep sessions, queued and retained messages across restart()
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _iotcore: object | None = field(default=None, repr=False)
    _dir: Path | None = field(default=None, repr=False)
    chosen: str = ""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "", "::") else self.bind
        return f"mqtt://{host}:{self.port}"

    def _choose(self) -> str:
        if self.backend == "mosquitto" or (self.backend == "auto" and find_mosquitto()):
            if not find_mosquitto():
                raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
            return "mosquitto"
        if self.backend in ("iotcore", "auto") and iotcore_available():
            return "iotcore"
        raise BrokerError(
            "no MQTT v5 broker available: install Mosquitto (apt-get install mosquitto) or `pip install iotcore`"
        )

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.bind, 0))
                self.port = int(s.getsockname()[1])
        self.chosen = self._choose()
        if self._dir is None:  # kept by restart(): the persistence file lives there
            self._dir = Path(tempfile.mkdtemp(prefix="fedhft-broker-"))
            self._dir.chmod(0o755)  # Mosquitto started as root reads its files as the mosquitto user
        if self.chosen == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            data = self._dir / "data" if self.persistent else None
            if data is not None:
                data.mkdir(exist_ok=True)
                data.chmod(0o777)  # written by the mosquitto user when started as root
            conf.write_text(embedded_mosquitto_config(self.port, self.bind, data))
            conf.chmod(0o644)
            self._proc = subprocess.Popen([str(find_mosquitto()), "-c", str(conf)])
            alive = self._proc_alive
        else:
            from iotcore import Broker  # optional dependency

            conf = self._dir / "rumqttd.toml"
            conf.write_text(iotcore_config(self.port, self.bind))
            self._iotcore = Broker(config_path=str(conf))
            self._iotcore.start(timeout=timeout)  # type: ignore[attr-defined]
            alive = None
        if not wait_for_port(self.bind, self.port, timeout, alive):
            self.stop()
            raise BrokerError(f"{self.chosen} did not listen on {self.bind}:{self.port} within {timeout} s")
        event(log, "broker listening", backend=self.chosen, url=self.url)
        return self

    def _proc_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._iotcore is not None:
            self._iotcore.stop()  # type: ignore[attr-defined]
            self._iotcore = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self, down_seconds: float = 0.0, timeout: float = 10.0) -> EmbeddedBroker:
        """Stop the process (cleanly: a persistent broker saves its state) and start again on the same port."""
        if self.chosen != "mosquitto" or self._proc is None:
            raise BrokerError("restart() needs a running embedded mosquitto")
        stop_process(self._proc)
        self._proc = None
        time.sleep(down_seconds)
        return self.start(timeout)

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set or the broker dies (BrokerError)."""
        while not stop.wait(0.5):
            if self.chosen == "mosquitto" and not self._proc_alive():
                raise BrokerError("mosquitto exited unexpectedly")

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
