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


# A parent holding 150 MB forks; the child, which holds the same pages copy-on-write, sleeps without exec.
FORK_WITHOUT_EXEC = """
import os, time
held = b"x" * (150 << 20)
pid = os.fork()
if pid == 0:
    time.sleep(1.0)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_that_has_not_exec_d_is_not_counted_twice() -> None:
    m = run_measured([sys.executable, "-c", FORK_WITHOUT_EXEC], interval=0.01)
    assert m.returncode == 0, m.stderr
    assert m.samples > 20
    assert 150 <= m.peak_sum_mb < 200, m  # counted twice: >= 300
    assert 150 <= m.hwm_sum_mb < 200, m


def test_tree_pids_finds_this_process() -> None:
    import os

    assert tree_pids(os.getpid())[0] == os.getpid()
