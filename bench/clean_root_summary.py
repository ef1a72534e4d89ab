"""The summary of a `make clean-root-check` run (scripts/clean-root-check): bench/results/clean-root.json and .txt.

Reads the run folder: facts.txt (``key=value`` lines: exit codes, millisecond stamps, which ports answered),
the package lists before and after `make services`, the one-line runs as user nobody, services.log, test.log,
pg_lsclusters.txt and processes.txt. Exits 1 unless the run shows the fresh path whole: nothing in sight before,
one line naming the packages for a user who may not install, `make services` installing and starting them, and
the bounded `make test` passing with torch's CPU build in the venv.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# what scripts/ensure-services must name for a user who may not install anything, per make target
ONE_LINE_PACKAGES = {
    "test": ("python3-venv", "cmake", "g++", "mosquitto", "postgresql"),
    "demo": ("python3-venv", "mosquitto"),
}
PYTEST_SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ (passed|failed|error).*) in (?P<secs>[\d.]+)s")


def read_facts(path: Path) -> dict[str, str]:
    """``key=value`` lines; a later key wins."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split("=", 1) for line in lines if "=" in line)


def lines(path: Path) -> list[str]:
    return [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.is_file() else []


def pytest_counts(log: list[str]) -> dict[str, int | float | str] | None:
    """The counts of pytest's closing line (``12 passed, 1 failed in 3.2s``), None when there is none."""
    for line in reversed(log):
        m = PYTEST_SUMMARY.match(line.strip())
        if m:
            counts: dict[str, int | float | str] = {"line": line.strip("= ").strip(), "seconds": float(m["secs"])}
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", m["counts"]):
                counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
            return counts
    return None


def one_line_check(work: Path, target: str, rc: int) -> dict:
    """`make TARGET` as nobody: its exit code, and whether ensure-services said it in one line naming each package."""
    err = [x for x in lines(work / f"nobody-{target}.err") if not x.startswith("make")]
    out = lines(work / f"nobody-{target}.out")
    wanted = ONE_LINE_PACKAGES[target]
    said = err[0] if len(err) == 1 else ""
    return {
        "command": f"make {target} (as user nobody: no root, no sudo)",
        "exit_code": rc,
        "stderr": err,
        "stdout": out,
        "names": list(wanted),
        "ok": rc != 0
        and all(re.search(rf"(^|\s){re.escape(p)}(\s|:|$)", said) for p in wanted)
        and not any("pytest" in x or " passed" in x for x in out + err),
    }


def summarize(work: Path, base_seconds: str, total: int, commit: str, suite: str, pytest_args: str) -> dict:
    f = read_facts(work / "facts.txt")

    def ms(a: str, b: str) -> float | None:
        return round((int(f[b]) - int(f[a])) / 1000, 1) if a in f and b in f else None

    before, after = set(lines(work / "packages-before.txt")), set(lines(work / "packages-after.txt"))
    test_log = lines(work / "test.log")
    counts = pytest_counts(test_log)
    s: dict = {
        "what": f"make services and make test on a fresh Debian {suite} (debootstrap minbase + make, python3, "
        "ca-certificates) in private net/mount/pid namespaces: loopback only, Debian's mirror and PyPI through "
        "scripts/netns-proxy, which refuses this machine's addresses",
        "commit": commit,
        "before": {
            "listening": {p: f.get(f"listening_before_{p}") == "yes" for p in ("1883", "5432")},
            "programs": lines(work / "programs-before.txt"),
            "packages": len(before),
        },
        "one_line": {t: one_line_check(work, t, int(f.get(f"nobody_{t}_rc", "0"))) for t in ("test", "demo")},
        "services": {
            "command": "make services (as root)",
            "exit_code": int(f.get("services_rc", "-1")),
            "seconds": ms("services_start", "services_end"),
            "output": lines(work / "services.log"),
            "packages_installed": len(after - before),
            "packages_installed_named": sorted(
                p
                for p in after - before
                if p in ("python3-venv", "cmake", "g++", "mosquitto", "postgresql") or p.startswith("postgresql-1")
            ),
            "pg_lsclusters": lines(work / "pg_lsclusters.txt"),
            "listening": {p: f.get(f"listening_after_{p}") == "yes" for p in ("1883", "5432")},
            "daemons": [x for x in lines(work / "processes.txt") if re.search(r"postgres|mosquitto", x)],
        },
        "test": {
            "command": f"make test PYTEST_ARGS='{pytest_args}' (as root)",
            "exit_code": int(f.get("test_rc", "-1")),
            "seconds": ms("test_start", "test_end"),
            "pytest": counts,
            "venv": {"megabytes": int(f.get("venv_mb") or 0), "torch": f.get("torch", "")},
            "tail": test_log[-15:],
        },
        "seconds": {"base_root": base_seconds, "total": total},
    }
    s["ok"] = bool(
        not any(s["before"]["listening"].values())
        and not s["before"]["programs"]
        and all(c["ok"] for c in s["one_line"].values())
        and s["services"]["exit_code"] == 0
        and s["services"]["listening"]["5432"]
        and s["test"]["exit_code"] == 0
        and s["test"]["venv"]["torch"].endswith("+cpu")  # the Makefile's promise: torch's CPU build
        and counts is not None
        and int(counts.get("passed", 0)) > 0
        and not counts.get("failed")
        and not counts.get("error")
    )
    return s


def text(s: dict) -> str:
    """The few lines README quotes."""
    sv, t = s["services"], s["test"]
    listening = lambda d: ", ".join(p for p, up in d.items() if up) or "nothing"  # noqa: E731
    return "\n".join(
        [
            f"clean-root-check {'passed' if s['ok'] else 'FAILED'} (commit {s['commit']}): {s['what']}",
            f"before: {s['before']['packages']} packages, none of mosquitto/psql/cmake/c++; "
            f"listening on 1883/5432: {listening(s['before']['listening'])}",
            *(
                f"one line, make {k} as nobody: exit {c['exit_code']}: {' | '.join(c['stderr']) or '(nothing)'}"
                for k, c in s["one_line"].items()
            ),
            f"make services: exit {sv['exit_code']} in {sv['seconds']} s, {sv['packages_installed']} packages "
            f"installed ({', '.join(sv['packages_installed_named'])}); said: {' | '.join(sv['output'])}",
            f"  clusters: {' | '.join(sv['pg_lsclusters']) or 'none'}; listening after: {listening(sv['listening'])}",
            f"make test: exit {t['exit_code']} in {t['seconds']} s (pip install, import contracts, native trainer, "
            f"pytest): {t['pytest']['line'] if t['pytest'] else 'no pytest summary'}; "
            f".venv {t['venv']['megabytes']} MB, torch {t['venv']['torch'] or 'not installed'}",
            f"seconds: base root {s['seconds']['base_root']}, total {s['seconds']['total']}",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="Path without suffix: writes .json and .txt")
    ap.add_argument("--base-seconds", default="cached")
    ap.add_argument("--total", type=int, default=0)
    ap.add_argument("--commit", default="")
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--pytest-args", default="")
    args = ap.parse_args()
    s = summarize(args.work, args.base_seconds, args.total, args.commit, args.suite, args.pytest_args)
    args.out.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text(s) + "\n")
    print(text(s))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
