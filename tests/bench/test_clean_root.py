"""bench/clean_root_summary.py: what a `make clean-root-check` run folder proves, and what makes it fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.clean_root_summary import pytest_counts, summarize, text

TEST_LINE = (
    "missing: python3-venv cmake g++ mosquitto postgresql: run `sudo apt-get install -y python3-venv cmake g++ "
    "mosquitto postgresql`, then run make again"
)
DEMO_LINE = "missing: python3-venv mosquitto: run `sudo apt-get install -y python3-venv mosquitto`, then run make again"


def run_folder(tmp_path: Path, **change: str) -> Path:
    """A passing run folder as scripts/clean-root-check writes it; ``change`` replaces a file's text."""
    files = {
        "facts.txt": "listening_before_1883=no\nlisting_x=1\nlistening_before_5432=no\nnobody_test_rc=2\n"
        "nobody_demo_rc=2\nservices_start=1000\nservices_rc=0\nservices_end=61500\nlistening_after_1883=yes\n"
        "listening_after_5432=yes\ntest_start=62000\ntest_rc=0\ntest_end=662000\nvenv_mb=2400\ntorch=2.13.0+cpu\n",
        "programs-before.txt": "",
        "packages-before.txt": "apt\nbase-files\npython3\n",
        "packages-after.txt": "apt\nbase-files\npython3\npython3-venv\ncmake\ng++\nmosquitto\npostgresql\n"
        "postgresql-15\nlibpq5\n",
        "nobody-test.err": TEST_LINE + "\nmake: *** [Makefile:32: services] Error 1\n",
        "nobody-test.out": "",
        "nobody-demo.err": DEMO_LINE + "\nmake: *** [Makefile:35: demo-services] Error 1\n",
        "nobody-demo.out": "",
        "services.log": "installing python3-venv cmake g++ mosquitto postgresql with apt-get ...\n",
        "pg_lsclusters.txt": "15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/postgresql/x.log\n",
        "processes.txt": "57 /usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main\n",
        "test.log": "installing fedhft ...\n........ [100%]\n33 passed, 1 skipped in 95.20s (0:01:35)\n",
    }
    for key, body in change.items():  # nobody_test_err -> nobody-test.err
        stem, ext = key.rsplit("_", 1)
        files[f"{stem.replace('_', '-')}.{ext}"] = body
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    return tmp_path


def summary(work: Path) -> dict:
    return summarize(work, "131", 700, "abc1234", "bookworm", "tests/support")


def test_pytest_counts_reads_the_closing_line() -> None:
    assert pytest_counts(["x", "=== 3 failed, 30 passed, 2 errors in 1.50s ==="]) == {
        "line": "3 failed, 30 passed, 2 errors in 1.50s",
        "seconds": 1.5,
        "failed": 3,
        "passed": 30,
        "error": 2,
    }
    assert pytest_counts(["ERROR: file or directory not found: tests/nope.py"]) is None


def test_a_whole_fresh_path_passes(tmp_path: Path) -> None:
    s = summary(run_folder(tmp_path))
    assert s["ok"], s
    assert s["services"]["seconds"] == 60.5 and s["test"]["seconds"] == 600.0
    assert s["services"]["packages_installed"] == 7
    assert s["services"]["packages_installed_named"] == [
        "cmake", "g++", "mosquitto", "postgresql", "postgresql-15", "python3-venv"
    ]  # fmt: skip
    assert s["one_line"]["test"]["stderr"] == [TEST_LINE]
    assert s["test"]["pytest"]["passed"] == 33
    t = text(s)
    assert t.startswith("clean-root-check passed (commit abc1234)")
    assert f"one line, make test as nobody: exit 2: {TEST_LINE}" in t
    assert "listening on 1883/5432: nothing" in t and "listening after: 1883, 5432" in t
    assert "make test: exit 0 in 600.0 s" in t and "33 passed, 1 skipped in 95.20s" in t
    assert ".venv 2400 MB, torch 2.13.0+cpu" in t


@pytest.mark.parametrize(
    "change",
    [
        {"facts_txt": "listening_before_5432=yes\nservices_rc=0\ntest_rc=0\nlistening_after_5432=yes\n"},
        {"programs_before_txt": "/usr/sbin/mosquitto\n"},
        {"nobody_test_err": "missing: mosquitto\nand a second line\n"},
        {"nobody_demo_err": "missing: mosquitto: run `sudo apt-get install -y mosquitto`\n"},
        {"nobody_test_out": "33 passed in 1.00s\n"},
        {"test_log": "1 failed, 32 passed in 9.00s\n"},
        {"test_log": "make: *** [Makefile:40: native] Error 1\n"},
        {"facts_txt": "services_rc=0\nlistening_after_5432=yes\nnobody_test_rc=2\nnobody_demo_rc=2\ntest_rc=0\n"
         "torch=2.13.0\n"},
    ],
    ids=["host-postgres-in-sight", "mosquitto-there-before", "two-lines", "line-misses-python3-venv",
         "tests-ran-as-nobody", "a-test-failed", "no-pytest", "cuda-torch"],
)  # fmt: skip
def test_a_run_that_falls_short_fails(tmp_path: Path, change: dict[str, str]) -> None:
    s = summary(run_folder(tmp_path, **change))
    assert not s["ok"]
    assert text(s).startswith("clean-root-check FAILED")
