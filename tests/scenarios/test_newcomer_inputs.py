"""The bad inputs a new user or operator runs into (issue 13's list), each answered by one `error:` line and exit
status 1, never a traceback; and the help and numbers the command line shows.

Covered elsewhere: plan/export on unusable models (tests/export/test_families_cli.py), `edge run` against an
unreachable broker, a mistyped host and refused credentials (tests/edge_runtime/test_connection_lines.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.simulate.methods import methods


def one_error_line(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def _credentials_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    args = ["broker", "config", "--out", str(conf), "--task", "t", "--server-user", "srv", "--client", "dev-1"]
    assert CliRunner().invoke(main, [*args, "--no-tls", "--no-persistence"]).exit_code == 0
    return conf


def _user_csv(tmp_path: Path) -> Path:
    path = tmp_path / "mine.csv"
    path.write_text("text,label,user\n" + "".join(f"t{i},{'ab'[i % 2]},u{i % 3}\n" for i in range(30)))
    return path


SIM = ["simulate", "--clients", "3", "--profiles", "rpi4-4gb:3", "--split", "natural"]

CASES = {
    "report on an empty directory": (
        lambda t: ["report", str(t)],
        "has no report.json (run `fedhft simulate --out DIR` first)",
    ),
    "report on a missing directory": (lambda t: ["report", str(t / "nope")], "nope does not exist"),
    "report on a file that is not a report": (
        lambda t: ["report", str(_write(t / "r.json", json.dumps({"rows": []})))],
        "is not a simulation report (no config and methods)",
    ),
    "report on broken JSON": (
        lambda t: ["report", str(_write(t / "report.json", "{"))],
        "is not a readable report:",
    ),
    "device add before `server init` made the server key": (
        lambda t: [
            "device",
            "add",
            "--conf",
            str(_credentials_conf(t)),
            "--task",
            "t",
            "--client-id",
            "dev-2",
            "--server-key",
            str(t / "state" / "server_key.pub"),
        ],  # fmt: skip
        "does not exist: create the server's key first with `fedhft server init --state DIR`",
    ),
    "server run given credentials.txt as its password file": (
        lambda t: [
            "server",
            "run",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--task",
            "t",
            "--state",
            str(t / "s"),
            "--manifest",
            str(t),
            "--password-file",
            str(_credentials_conf(t) / "credentials.txt"),
        ],  # fmt: skip
        "is the broker's credentials.txt (one `user password` line per user), not a password file",
    ),
    "rotate-key before the server has a key": (
        lambda t: ["server", "rotate-key", "--state", str(t)],
        "create it with `fedhft server init --state",
    ),
    "--split natural on a user file without --group-column": (
        lambda t: [*SIM, "--dataset", str(_user_csv(t)), "--out", str(t / "o")],
        "--split natural: data set 'mine' has no natural groups",
    ),
    "--group-column naming no column": (
        lambda t: [*SIM, "--dataset", str(_user_csv(t)), "--group-column", "dept", "--out", str(t / "o")],
        "missing column(s) ['dept']",
    ),
    "--group-column read: 3 users of 10 examples are too few to split": (
        lambda t: [*SIM, "--dataset", str(_user_csv(t)), "--group-column", "user", "--out", str(t / "o")],
        "a natural split of 30 examples leaves a client with < 9",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line(case: str, tmp_path: Path) -> None:
    build, message = CASES[case]
    line = one_error_line(build(tmp_path))
    assert message in line, line


def test_profiles_show_prints_rounded_numbers() -> None:
    res = CliRunner().invoke(main, ["profiles", "show", "phone-midrange-6gb"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["memory_budget_mb"] == 1843.2
    assert '"memory_budget_mb": 1843.2,' in res.output and "99999" not in res.output


def test_simulate_method_help_lists_every_accepted_method() -> None:
    res = CliRunner().invoke(main, ["simulate", "--help"], terminal_width=200)
    assert res.exit_code == 0
    help_text = " ".join(res.output.split())
    listed = help_text.split("same split and seed):", 1)[1].split(".", 1)[0]
    assert [m.strip() for m in listed.split(",")] == list(methods())
    assert len(methods()) >= 7
