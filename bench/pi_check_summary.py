"""The summary of a `make pi-check` run (scripts/pi-check): what its logs prove, as bench/results/pi-check.json/.txt.

Reads the run folder's server.log and edge.log (fedhft's `ts level logger event key=value` lines), pip-list.txt (the
device's installed packages) and arch.txt; exits 1 unless the logs show a whole round: the device registered, its
signed models accepted, its update accepted by the server and a new version aggregated from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ (?P<level>\w+) (?P<logger>\S+) (?P<rest>.*)$")
HEAVY = ("torch", "executorch", "transformers", "optimum", "onnxruntime")


@dataclass(frozen=True)
class Event:
    level: str
    logger: str
    msg: str
    fields: dict[str, str]


def parse_line(line: str) -> Event | None:
    """One structured log line; the message is the text before the first ``key=value``."""
    m = LINE.match(line.strip())
    if m is None:
        return None
    try:
        words = shlex.split(m["rest"])
    except ValueError:
        words = m["rest"].split()
    msg = [w for w in words if not re.match(r"^[a-z_]+=", w)]
    fields = dict(w.split("=", 1) for w in words if re.match(r"^[a-z_]+=", w))
    return Event(m["level"], m["logger"], " ".join(msg), fields)


def events(path: Path) -> list[Event]:
    if not path.is_file():
        return []
    return [e for e in map(parse_line, path.read_text(errors="replace").splitlines()) if e is not None]


def find(evs: list[Event], msg: str) -> list[dict[str, str]]:
    return [e.fields for e in evs if e.msg == msg]


def summarize(work: Path, timings: dict[str, int], total: int, trainer: Path, port: int, manifest: Path) -> dict:
    server, edge = events(work / "server.log"), events(work / "edge.log")
    m = json.loads(manifest.read_text())
    packages = dict(line.split("==", 1) for line in (work / "pip-list.txt").read_text().splitlines() if "==" in line)
    edge_text = (work / "edge.log").read_text(errors="replace")
    done = re.search(r"(\d+) round\(s\) trained, (\d+) update\(s\) acked", edge_text)
    summary = {
        "what": "make pi-check: one rpi4-4gb device in an emulated arm64 Debian root (debootstrap bookworm, "
        "qemu-user binfmt) runs its `fedhft device add` bundle (ExecuTorch program, native trainer cross-built "
        "for aarch64) against `fedhft server run` and a TLS Mosquitto on the x86 host",
        "model": {
            "base_model": m.get("base_model"),
            "profile": m["profile"]["name"],
            "max_seq_len": m["max_seq_len"],
            "artifacts": sorted(m["artifacts"]),
            "batch_size": m["profile"].get("batch_size"),
        },
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "device": {
            "arch": (work / "arch.txt").read_text().split(),
            "trainer": {"path": trainer.name, "bytes": trainer.stat().st_size},
            "edge_packages": packages,
            "heavy_packages_installed": sorted(p for p in packages if p.lower().startswith(HEAVY)),
        },
        "broker": f"mqtts://127.0.0.1:{port}",
        "server": {
            "registered": find(server, "client registered"),
            "updates_accepted": find(server, "update accepted"),
            "aggregated": find(server, "aggregated"),
        },
        "edge": {
            "models_accepted": find(edge, "accepted a model"),
            "models_refused": find(edge, "refused a model"),
            "updates_queued": find(edge, "update queued"),
            "updates_acked": find(edge, "update accepted"),
            "connected": [x for x in edge_text.splitlines() if x.startswith("connected to ")],
            "final_line": done.group(0) if done else None,
        },
        "seconds": {**timings, "total": total},
    }
    s = summary
    s["ok"] = bool(
        s["server"]["registered"]
        and s["server"]["updates_accepted"]
        and any(int(a.get("version", 0)) >= 1 for a in s["server"]["aggregated"])
        and s["edge"]["models_accepted"]
        and not s["edge"]["models_refused"]
        and s["edge"]["updates_acked"]
        and not s["device"]["heavy_packages_installed"]
        and s["device"]["arch"][:1] == ["aarch64"]
    )
    return summary


def text(s: dict) -> str:
    """The few lines README quotes."""
    t = s["seconds"]
    order = ["trainer", "base-root", "device-root", "export", "federation", "round"]
    steps = ", ".join(f"{k} {t[k]} s" for k in order if k in t)
    models = ", ".join(f"v{m.get('version')}" for m in s["edge"]["models_accepted"])
    queued = s["edge"]["updates_queued"]
    losses = ", ".join(f"{q.get('loss')}" for q in queued)
    versions = ", ".join(f"v{a.get('version')}" for a in s["server"]["aggregated"])
    pkgs = ", ".join(f"{k} {v}" for k, v in sorted(s["device"]["edge_packages"].items()))
    return "\n".join(
        [
            f"pi-check {'passed' if s['ok'] else 'FAILED'}: device {s['device']['arch'][0]} (qemu-user), "
            f"model {s['model']['base_model']} ({s['model']['profile']}, {'+'.join(s['model']['artifacts'])}), "
            f"broker {s['broker']}",
            f"device: accepted signed models {models or 'none'}; {len(queued)} update(s) sent (loss {losses}); "
            f"{len(s['edge']['updates_acked'])} acked; {s['edge']['final_line']}",
            f"server: {len(s['server']['updates_accepted'])} update(s) accepted, aggregated {versions or 'nothing'}",
            f"device packages (pip install '.[edge]'): {pkgs}",
            f"heavy packages on the device: {', '.join(s['device']['heavy_packages_installed']) or 'none'}",
            f"seconds: {steps}; total {t['total']} s",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="Path without suffix: writes .json and .txt")
    ap.add_argument("--timings", default="", help="'step=seconds ...'")
    ap.add_argument("--total", type=int, default=0)
    ap.add_argument("--trainer", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--manifest", type=Path, default=None, help="The exported profile's manifest.json")
    args = ap.parse_args()
    timings = {k: int(v) for k, v in (p.split("=", 1) for p in args.timings.split())}
    manifest = args.manifest or args.work.parent / "pi-export" / "rpi4-4gb" / "manifest.json"
    s = summarize(args.work, timings, args.total, args.trainer, args.port, manifest)
    args.out.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text(s) + "\n")
    print(text(s))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
