"""The locked-down deployment for real: `fedhft broker config` (TLS, password file, per-task ACL) on a real
Mosquitto with a CA and server certificate made by the test; the attempted-actions matrix; and
`fedhft server run` + `fedhft edge run` exchanging an update and a model over TLS with credentials.

(Refusal of unsigned, tampered, replayed-older, wrong-task and misaddressed models is tested in
test_edge_client.py; key rotation in test_key_rotation.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from fedhft.broker_server.broker.devices import add_device
from fedhft.cli import main
from tests.edge_runtime.test_local_train import write_csv
from tests.support.server import ServerProcess, wait_until
from tests.support.tls_broker import MATRIX_TASKS, markdown_table, security_matrix, tls_lab

TASK = "tls-task"


def test_every_attempted_action_has_the_expected_outcome_on_a_tls_mosquitto() -> None:
    with tls_lab(MATRIX_TASKS) as lab:
        rows = security_matrix(lab)
    assert len(rows) >= 30
    assert all(r.ok for r in rows), "\n" + markdown_table(rows)


def test_server_and_edge_run_exchange_an_update_and_a_model_over_tls_with_credentials(
    tiny_export: Path, tmp_path: Path
) -> None:
    with tls_lab({TASK: ("srv", [])}) as lab:
        state = tmp_path / "server-state"
        server = ServerProcess(
            lab.url,
            TASK,
            state,
            tiny_export,
            *("--username", "srv", "--password-file", str(lab.password_file("srv")), "--tls-ca", lab.tls.cafile),
            *("--buffer-size", "1"),
        )
        server.start()
        try:
            bundle = add_device(lab.conf_dir, TASK, "dev-1", state / "server_key.pub", broker_url=lab.url)
            lab.reload()
            args = ["run", "--artifacts", str(tiny_export), "--data", str(write_csv(tmp_path / "d.csv", 24))]
            args += ["--broker", bundle.broker_url, "--task", TASK, "--client-id", "dev-1"]
            args += ["--state-dir", str(tmp_path / "edge"), "--server-key", str(bundle.dir / "server_key.pub")]
            args += ["--username", "dev-1", "--password-file", str(bundle.dir / "password")]
            args += ["--tls-ca", str(bundle.dir / "ca.crt"), "--local-steps", "3", "--rounds", "1"]
            res = CliRunner().invoke(main, ["edge", *args])
            assert res.exit_code == 0, res.output
            assert re.search(r"1 round\(s\) trained, 1 update\(s\) acked, model version [01]", res.output)
            assert wait_until(lambda: server.metric("fedhft_model_version") == 1.0, 20), server.log_text()[-2000:]
        finally:
            assert server.stop() == 0
