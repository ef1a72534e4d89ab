"""scripts/netns-proxy: the clean root's only way out refuses every address of this machine, so the root's tests
cannot reach this machine's Mosquitto or PostgreSQL through it (the clean-root run shows the registries pass)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.mosquitto import free_port

PROXY = ROOT / "scripts" / "netns-proxy"


def started(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(PROXY), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().decode().strip() == f"netns-proxy {args[0]} ready"
    return proc


@pytest.fixture
def proxy_port(tmp_path: Path) -> Iterator[int]:
    """The two halves as scripts/clean-root-check runs them: serve on a Unix socket, relay from a TCP port."""
    sock, port = tmp_path / "proxy.sock", free_port()
    procs = [started("serve", str(sock))]
    procs.append(started("relay", str(port), str(sock)))
    yield port
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def ask(port: int, request: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        return s.recv(4096).decode().split("\r\n")[0]


@pytest.mark.parametrize(
    "request_text",
    [
        "CONNECT 127.0.0.1:5432 HTTP/1.1\r\nHost: 127.0.0.1:5432\r\n\r\n",
        "CONNECT localhost:1883 HTTP/1.1\r\n\r\n",
        "GET http://127.0.0.2:8080/ HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n",
        "CONNECT [::1]:5432 HTTP/1.1\r\n\r\n",
    ],
    ids=["postgres", "mosquitto-by-name", "loopback-http", "ipv6-loopback"],
)
def test_this_machines_services_are_refused(proxy_port: int, request_text: str) -> None:
    assert ask(proxy_port, request_text) == "HTTP/1.1 403 Forbidden"


def test_an_address_this_machine_holds_is_refused(proxy_port: int) -> None:
    # the address this machine reaches the outside from (its own, though not loopback); 192.0.2.1 is never dialled
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no route out (a private network namespace): no non-loopback address of this machine")
        own = s.getsockname()[0]
    assert ask(proxy_port, f"CONNECT {own}:5432 HTTP/1.1\r\n\r\n") == "HTTP/1.1 403 Forbidden"


def test_a_malformed_request_is_a_400(proxy_port: int) -> None:
    assert ask(proxy_port, "HELLO\r\n\r\n") == "HTTP/1.1 400 Bad Request"


def test_a_bad_command_line_says_how_to_call_it() -> None:
    r = subprocess.run([sys.executable, str(PROXY), "serve"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2
    assert r.stderr == "usage: netns-proxy serve SOCK | netns-proxy relay PORT SOCK\n"
