"""bench/tree_rss.py: the summed resident memory of a command's whole process tree."""

from __future__ import annotations

import sys

from bench.tree_rss import run_measured, tree_pids

# A parent holding 60 MB starts a child that holds 80 MB; both are alive together for about a second.
TWO_PROCESSES = """
import subprocess, sys, time
held = b"x" * (60 << 20)
child = subprocess.Popen([sys.executable, "-c", "import time; held = b'x' * (80 << 20); time.sleep(1.5)"])
child.wait()
"""


def test_the_peak_sums_the_parent_and_its_child() -> None:
    m = run_measured([sys.executable, "-c", TWO_PROCESSES], interval=0.01)
    assert m.returncode == 0, m.stderr
    assert len(m.peak_by_process_mb) == 2, m.peak_by_process_mb
    largest = max(m.peak_by_process_mb.values())
    assert largest >= 80
    # both processes at once: more than the larger alone by about the parent's 60 MB
    assert m.peak_sum_mb >= largest + 55, m
    assert m.hwm_sum_mb >= m.peak_sum_mb


def test_tree_pids_finds_this_process() -> None:
    import os

    assert tree_pids(os.getpid())[0] == os.getpid()
