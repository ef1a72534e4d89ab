"""Peak resident memory of a whole process tree (a command and every descendant), sampled from /proc.

`/usr/bin/time -v` and ru_maxrss report one process; a device's `fedhft edge train --backend native` is two
(the Python wrapper and the C++ trainer). `run_measured` starts a command, polls /proc every `interval` seconds,
and reports the largest sum of the tree's VmRSS seen at one instant (what the device must hold at once) and,
as an upper bound that no short spike escapes, the sum of each process's own peak (VmHWM). A child that still
runs its parent's image (forked, or vforked before its exec) is not counted: its pages are its parent's. Linux only.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class TreePeak:
    """Memory of one command's process tree, in MB (2**20 bytes)."""

    peak_sum_mb: float  # max over samples of the summed VmRSS of every live process in the tree
    hwm_sum_mb: float  # sum over processes of their own peak (VmHWM): >= peak_sum_mb
    peak_by_process_mb: dict[str, float] = field(default_factory=dict)  # "pid:name" -> its VmHWM
    samples: int = 0
    seconds: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def _status(pid: int) -> dict[str, str]:
    """Fields of /proc/PID/status ({} once the process is gone)."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def parent_map() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for d in PROC.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(d.name)] = int(fields[1])
    return parents


def tree_pids(root: int) -> list[int]:
    """`root` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def parents_image(status: Mapping[str, str], parent: Mapping[str, str] | None) -> bool:
    """Whether a process still runs its parent's image: forked (or vforked, sharing the parent's memory) and
    not yet exec'd or grown, so its VmRSS and VmHWM count the parent's pages again. Same name and VmSize."""
    return (
        parent is not None and status.get("Name") == parent.get("Name") and status.get("VmSize") == parent.get("VmSize")
    )


class TreeSampler:
    """Polls the tree under one pid in a background thread until `stop()`."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        total = 0
        statuses = {pid: st for pid in tree_pids(self.root) if (st := _status(pid))}
        for pid, st in statuses.items():
            if parents_image(st, statuses.get(int(st.get("PPid", "0")))):
                continue
            total += _kb(st.get("VmRSS"))
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), _kb(st.get("VmHWM")))
            self.names[pid] = st.get("Name", "?")
        self.peak_kb = max(self.peak_kb, total)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> TreePeak:
        by = {f"{pid}:{self.names[pid]}": round(kb / 1024, 1) for pid, kb in self.hwm_kb.items() if kb}
        return TreePeak(round(self.peak_kb / 1024, 1), round(sum(self.hwm_kb.values()) / 1024, 1), by, self.samples)


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 600,
    interval: float = 0.02,
) -> TreePeak:
    """Run `cmd` to its end (killed at `timeout`) while sampling its process tree; output is captured.
    A process that lives shorter than `interval` may be missed: the commands measured here run for seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(proc.pid, interval).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        sampler.stop()
    res = sampler.result()
    return TreePeak(
        res.peak_sum_mb,
        res.hwm_sum_mb,
        res.peak_by_process_mb,
        res.samples,
        round(time.perf_counter() - t0, 1),
        proc.returncode,
        out,
        err,
    )
