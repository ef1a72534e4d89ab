"""The Mosquitto fixture itself: a v5 client round trip and a restart on the same port."""

from __future__ import annotations

import threading

from fedhft.protocol.mqtt import make_client


def _roundtrip(port: int) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    c = make_client()

    def on_message(_c, _u, msg) -> None:  # noqa: ANN001
        got.append(msg.payload)
        done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe("t/#", qos=1)[0]
        c.publish("t/x", b"x" * 3_000_000, qos=1).wait_for_publish(timeout=10)
        assert done.wait(10)
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def test_broker_carries_large_payloads_and_restarts(mosquitto) -> None:  # noqa: ANN001
    assert len(_roundtrip(mosquitto.port)) == 3_000_000
    pid = mosquitto.proc.pid
    mosquitto.restart()
    assert mosquitto.proc.pid != pid
    assert len(_roundtrip(mosquitto.port)) == 3_000_000
