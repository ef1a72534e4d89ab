"""Render the committed bench results (bench/results/*.json) into README.md between BENCH markers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def ort_memory(d: dict) -> str:
    s = d["summary"]
    lines = [
        f"ORT training step on the packaged MiniLM (batch {d['batch']}, seq {d['seq']}, 5 labels), each variant in a "
        f"fresh torch-free process, same run ({d['machine']['cpu_count']} cores). *peak* = peak RSS of the process; "
        "*train* = peak minus the RSS of the interpreter with ONNX Runtime imported; *est* = the planner's estimate.",
        "",
        "| variant | depth | artifacts MB | peak MB | train MB | est MB | step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['variant']} | {r['depth']} | {r['artifact_mb']} | {r['peak_rss_mb']} | {r['train_mem_mb']} | "
            f"{r['est_peak_mb']} | {r['step_s']} |"
        )
    lines += [
        "",
        f"Full fine-tuning / planner plan with int8 base: **{s['peak_ratio_full_over_planned_int8']}x** less peak "
        f"RSS, {s['train_mem_ratio_full_over_planned_int8']}x less training memory above the runtime. "
        f"Command: `{d['command']}` (also `make bench`).",
    ]
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[dict], str]] = {"ORT_MEMORY": ort_memory}
FILES = {"ORT_MEMORY": "ort_memory.json"}


def render(readme: str) -> str:
    for key, fn in RENDERERS.items():
        path = RESULTS / FILES[key]
        if not path.is_file():
            continue
        block = f"<!-- BENCH:{key} -->\n{fn(json.loads(path.read_text()))}\n<!-- /BENCH:{key} -->"
        pattern = re.compile(rf"<!-- BENCH:{key} -->.*?(<!-- /BENCH:{key} -->|$)", re.S)
        if f"<!-- /BENCH:{key} -->" not in readme:
            pattern = re.compile(rf"<!-- BENCH:{key} -->")
        readme = pattern.sub(lambda _m, b=block: b, readme, count=1)
    return readme


def main() -> None:
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))


if __name__ == "__main__":
    main()
