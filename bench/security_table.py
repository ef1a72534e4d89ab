"""Security figures: attempted actions x expected x observed outcome against a real, locked-down Mosquitto.

The broker is configured by `fedhft broker config` (TLS with a CA and server certificate made on the spot by
`cryptography`, password file, per-task ACL), started in the foreground on 127.0.0.1 and stopped by PID.
The matrix (connections, publishes, subscriptions of devices and server identities of two tasks, device
add/revoke with SIGHUP) is the one tests/scenarios/test_security_tls.py asserts: both import
tests/support/tls_broker.py.

Run: `.venv/bin/python bench/security_table.py` (a few seconds; needs mosquitto); writes
bench/results/security.json and prints the markdown table. Exit status 1 when an outcome is not the expected one.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # tests.support (the shared test helpers) and this checkout's fedhft

from fedhft.broker_server.broker.embedded import find_mosquitto  # noqa: E402
from tests.support.tls_broker import MATRIX_TASKS, markdown_table, security_matrix, tls_lab  # noqa: E402


def mosquitto_version() -> str:
    exe = find_mosquitto()
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10, check=False)
    return next((line.strip() for line in (out.stdout + out.stderr).splitlines() if "version" in line), "unknown")


def main() -> int:
    t0 = time.perf_counter()
    with tls_lab(MATRIX_TASKS) as lab:
        rows = security_matrix(lab)
    seconds = time.perf_counter() - t0
    result = {
        "broker": mosquitto_version(),
        "python": platform.python_version(),
        "tasks": {t: {"server_user": s, "clients": c} for t, (s, c) in MATRIX_TASKS.items()},
        "tls": "TLS 1.2+, server certificate for 127.0.0.1 signed by a test CA (P-256)",
        "rows": [r.as_dict() for r in rows],
        "actions": len(rows),
        "as_expected": sum(r.ok for r in rows),
        "seconds": round(seconds, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "security.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(rows))
    print(f"\n{result['as_expected']}/{len(rows)} as expected in {seconds:.1f} s ({result['broker']})")
    return 0 if result["as_expected"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
