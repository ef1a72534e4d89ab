"""A simulation's child processes (server and edges): start, kill -9 and restart for chaos, note how edges
ended, read their peak memory, stop them all.

The edges run one `fedhft edge run` process per device, or (``hosts`` > 0) a few `fedhft edge host` processes
that each run a share of the devices over shared training runtimes; a process is named by its client id, or
host0, host1, ... (``members`` says which devices each runs)."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedhft.logs import event
from fedhft.procs import stop_process
from fedhft.simulate.commands import edge_command_of, host_command

log = logging.getLogger("fedhft.simulate")


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory (VmHWM, MiB) of a running process; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Fleet:
    """The run's child processes (server and edges) with their commands, so chaos can kill and restart them."""

    run_dir: Path
    server_cmd: list[str]
    edge_cmds: dict[str, list[str]] = field(default_factory=dict)  # edge process name -> its command
    members: dict[str, list[str]] = field(default_factory=dict)  # host process name -> the client ids it runs
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # "server" and client ids
    restart_at: dict[str, float] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)  # client id -> exit code of an edge that gave up
    restarts: int = 0

    def add_edges(self, devices: dict[str, dict[str, object]], hosts: int) -> None:
        """The edge processes of ``devices`` (client id -> `fedhft edge run` options): one per device when
        ``hosts`` is 0, else ``hosts`` host processes, device i on host i mod ``hosts`` (profiles mixed)."""
        if not hosts:
            self.edge_cmds |= {cid: edge_command_of(opts) for cid, opts in devices.items()}
            return
        (self.run_dir / "hosts").mkdir(exist_ok=True)
        for h in range(hosts):
            name, share = f"host{h}", list(devices)[h::hosts]
            path = self.run_dir / "hosts" / f"{name}.json"
            path.write_text(json.dumps({"devices": [devices[cid] for cid in share]}, indent=1) + "\n")
            self.edge_cmds[name], self.members[name] = host_command(path), share

    def _log(self, name: str) -> Path:
        if name in self.members:
            return self.run_dir / "hosts" / f"{name}.log"
        return self.run_dir / ("server.log" if name == "server" else f"clients/{name}/edge.log")

    def start(self, name: str) -> None:
        cmd = self.server_cmd if name == "server" else self.edge_cmds[name]
        self.procs[name] = subprocess.Popen(cmd, stdout=open(self._log(name), "a"), stderr=subprocess.STDOUT)

    def kill(self, name: str, restart_in: float) -> bool:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return False
        p.kill()  # SIGKILL: no cleanup, as a power cut or an OOM kill
        p.wait(timeout=10)
        self.restart_at[name] = time.monotonic() + restart_in
        return True

    def running_edges(self) -> list[str]:
        return sorted(c for c, p in self.procs.items() if c != "server" and p.poll() is None)

    def supervise(self) -> None:
        """Restart what chaos killed once its delay has passed; note edges that finished or gave up."""
        now = time.monotonic()
        for name, at in list(self.restart_at.items()):
            if now >= at:
                del self.restart_at[name]
                self.start(name)
                self.restarts += 1
        for cid, p in self.procs.items():
            if cid == "server" or cid in self.restart_at or cid in self.finished or cid in self.failed:
                continue
            code = p.poll()
            if code == 0:
                self.finished.add(cid)
            elif code is not None:
                self.failed[cid] = code
                event(log, "an edge runtime exited with an error", logging.WARNING, client=cid, code=code)

    def edges_active(self) -> bool:
        return any(c not in self.finished and c not in self.failed for c in self.edge_cmds)

    def stop(self) -> None:
        for name, p in self.procs.items():
            if name != "server":
                stop_process(p, grace=20)
        if "server" in self.procs:
            stop_process(self.procs["server"], grace=20)
