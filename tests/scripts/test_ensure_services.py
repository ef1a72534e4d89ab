"""scripts/ensure-services: silent when all is there, else one line naming what to install or start."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import ROOT
from tests.support.mosquitto import free_port

SCRIPT = ROOT / "scripts" / "ensure-services"


def ensure(*pieces: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *pieces], env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def test_with_everything_up_it_says_and_changes_nothing() -> None:
    # make test ran it before pytest: a second run finds Mosquitto, PostgreSQL, cmake and python3-venv in place
    r = ensure(FEDHFT_NO_APT="1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_a_user_who_may_not_install_gets_one_line_naming_the_package(tmp_path: Path) -> None:
    no_venv = tmp_path / "python-without-venv"  # as Debian's python3 without python3-venv: no ensurepip
    no_venv.write_text("#!/bin/sh\nexit 1\n")
    no_venv.chmod(0o755)
    r = ensure("venv", PYTHON=str(no_venv), FEDHFT_NO_APT="1")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("missing: python3-venv")
    assert "apt-get install -y python3-venv" in r.stderr or "brew" in r.stderr


def test_a_named_postgresql_server_that_is_down_is_one_line_and_nothing_is_installed() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    r = ensure("postgresql", FEDHFT_TEST_POSTGRES=url)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"PostgreSQL is not reachable at {url}: start that server (or name another server with "
        "FEDHFT_TEST_POSTGRES=postgresql://USER@HOST:PORT/DB), then run make again"
    ]


def test_an_unknown_piece_is_refused() -> None:
    r = ensure("redis")
    assert r.returncode == 2
    assert r.stderr == "ensure-services: unknown piece 'redis' (pieces: venv native mosquitto postgresql)\n"
