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


def wire_bytes(d: dict) -> str:
    full = d["full_finetune_fedavg"]["bytes_fp32"]
    r8 = d["lora_r8_qv_all_layers_dense_fp32"]["encoded_bytes"]
    lines = [
        f"Bytes on the wire per update ({d['model']}; encoded by `fedhft.protocol`, zlib-compressed), against FedAvg "
        f"of full fine-tuning ({full / 1e6:.1f} MB fp32) and homogeneous LoRA r=8 on q,v of all layers "
        f"({r8 / 1e3:.1f} kB encoded fp32). ΔW err = relative error of the rebuilt B·A.",
        "",
        "| profile | mask | depth | ranks | fp32 kB | fp16 kB | int8 kB | full ÷ fp16 | LoRA-r8 ÷ fp16 | ΔW err fp16 | "
        "ΔW err int8 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["profiles"]:
        lines.append(
            f"| {r['profile']} | {r['mask_ratio']} | {r['depth']} | {','.join(map(str, r['ranks']))} | "
            f"{r['bytes_fp32'] / 1e3:.1f} | {r['bytes_fp16'] / 1e3:.1f} | {r['bytes_int8'] / 1e3:.1f} | "
            f"{r['full_over_fp16']}x | {r['lora_r8_over_fp16']}x | {r['delta_rel_err_fp16']:.1e} | "
            f"{r['delta_rel_err_int8']:.1e} |"
        )
    lines += ["", "Command: `python bench/wire_bytes.py`. fp16 is the default encoding (`fedhft edge run --encoding`)."]
    return "\n".join(lines)


def server_ingest(d: dict) -> str:
    lines = [
        f"One server process through Mosquitto on loopback, {d['profile']} updates of {d['model']}; pass-through = a "
        "plain subscriber on the same broker, same payloads, same run (median of 3).",
        "",
        "| payload | bytes | pass-through /s | server ingest /s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in d["ingest"]:
        lines.append(
            f"| {r['payload']} | {r['payload_bytes']} | {r['passthrough_per_s']} | {r['ingest_per_s']} | {r['ratio']} |"
        )
    lines += ["", "| buffered updates | rank | aggregate ms | persist ms | models ms |", "|---:|---:|---:|---:|---:|"]
    for r in d["aggregation_vs_updates"] + d["aggregation_vs_rank"]:
        lines.append(f"| {r['updates']} | {r['rank']} | {r['aggregate_ms']} | {r['persist_ms']} | {r['models_ms']} |")
    lines += ["", "Command: `python bench/server_ingest.py`. *models* = factor, encode and sign every client's model."]
    return "\n".join(lines)


def simulate(d: dict) -> str:
    """mean ± std over seeds of every method, macro-F1 beside accuracy, and the goals, missed ones said so."""
    from fedhft.simulate.report import pm, reread

    where = d.get("_dir", "bench/results/simulate")
    d = reread(d)  # summary and goals from the stored runs, with the report's own last k and budget
    c = d["config"]
    split = f"Dirichlet alpha {c['alpha']}" if c.get("split", "dirichlet") == "dirichlet" else "split by department"
    seeds = c.get("seeds") or [c.get("seed", 0)]
    budget = c.get("time_budget")
    lines = [
        f"`fedhft simulate` on {c['dataset']}, {c['clients']} devices "
        f"({', '.join(f'{k} x{v}' for k, v in c['profiles'].items())}),"
        f" {split}, {c['rounds']} rounds of {c['local_steps']} local steps per device, seq "
        f"{c['max_seq_len']}, seeds {', '.join(map(str, seeds))}; every method in the same configuration, same "
        f"splits and seeds. Figures are mean ± std over seeds (a single value: one seed). *final* = mean over the "
        f"last {c.get('last_k', 3)} global versions; *at budget* = the newest global version at virtual time "
        f"{'-' if budget is None else f'{budget:g} s'}; personalized = each client's own model on its test split, "
        "weighted by test examples; F1 = macro-F1.",
        "",
        "| method | seeds | global acc | global F1 | acc at budget | personalized acc | personalized F1 | "
        "up kB / client-round | simulated s to target | upload MB to target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in d["summary"]:
        lines.append(
            f"| {s['method']} | {len(s['seeds'])} | {pm(s.get('final_global_accuracy'))} | "
            f"{pm(s.get('final_global_macro_f1'))} | {pm(s.get('global_accuracy_at_budget'))} | "
            f"{pm(s.get('mean_personalized_accuracy'))} | {pm(s.get('mean_personalized_macro_f1'))} | "
            f"{pm(s.get('bytes_up_per_client_round'), '.1f', 1e3)} | "
            f"{pm(s.get('simulated_seconds_to_target'), '.0f')} | {pm(s.get('bytes_up_to_target'), '.2f', 1e6)} |"
        )
    ref = d.get("reference")
    if ref:
        lines.append(
            f"| *no model: majority label* | {len(ref['seeds'])} | {pm(ref['global_accuracy'])} | "
            f"{pm(ref['global_macro_f1'])} | - | {pm(ref['personalized_accuracy'])} | "
            f"{pm(ref['personalized_macro_f1'])} | - | - | - |"
        )
    target = d["methods"][0].get("target_accuracy")
    unable = {r["method"]: r["unable_to_participate"] for r in d["methods"] if r.get("unable_to_participate")}
    lines += ["", f"Target accuracy {target}; '-' where a figure is missing (e.g. a seed never reached the target)."]
    if ref:
        lines[-1] += (
            " *No model* answers the fleet's most frequent training label (global) or each client's own (personalized)"
            " on the same test sets: what a method must beat to have learned anything."
        )
    if len(seeds) > 1:
        lines += ["", "Every seed (global acc / global F1 / personalized acc):", ""]
        for s in d["summary"]:
            per = [
                f"{seed}: " + " / ".join(pm({"mean": s[k]["by_seed"][seed], "by_seed": {}}) for k in SEED_FIGURES)
                for seed in s[SEED_FIGURES[0]]["by_seed"]
            ]
            lines.append(f"- {s['method']}: " + "; ".join(per))
    for method, why in unable.items():
        lines.append(f"{method}: unable to participate: " + "; ".join(f"{k} ({v})" for k, v in why.items()) + ".")
    if d.get("goals"):  # a report of fedhft alone has no baseline to hold goals against
        lines += ["", "| goal | measured | need | met |", "|---|---:|---:|---|"]
    for g in d.get("goals", []):
        measured = "-" if g["measured"] is None else g["measured"]
        lines.append(f"| {g['goal']} | {measured} | ≥ {g['need']} | {'yes' if g['met'] else '**no**'} |")
    missed = [g for g in d.get("goals", []) if not g["met"]]
    if missed:
        lines += ["", f"**Goals missed ({len(missed)} of {len(d['goals'])}):** "]
        lines[-1] += "; ".join(
            f"{g['goal']}: {'not measured' if g['measured'] is None else g['measured']} against ≥ {g['need']}"
            + (f" ({g['note']})" if g.get("note") else "")
            for g in missed
        )
        lines[-1] += "."
    lines += [
        "",
        f"![accuracy]({where}/accuracy.png) ![traffic]({where}/traffic.png)",
        "",
        f"Command: `{c.get('command', 'python bench/simulate_compare.py')}`.",
    ]
    return "\n".join(lines)


SEED_FIGURES = ("final_global_accuracy", "final_global_macro_f1", "mean_personalized_accuracy")


def backends(d: dict) -> str:
    lines = [
        f"One training step on {d['model']}, `{d['profile']}` plan, batch {d['batch']}, seq {d['seq']}; every backend "
        "in the same run (fastest of the rounds); peak = VmHWM (native: wrapper + trainer process).",
        "",
        "| base | threads | backend | step s | step ÷ ORT | peak MB | peak ÷ ORT | artifacts MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        art = "-" if r.get("artifact_mb") is None else r["artifact_mb"]
        lines.append(
            f"| {r['base']} | {r['threads']} | {r['backend']} | {r['step_s']} | {r['step_ratio_to_ort']} | "
            f"{r['peak_rss_mb']} | {r['peak_ratio_to_ort']} | {art} |"
        )
    lines += ["", "Command: `python bench/backends.py`; aarch64: `bench/aarch64_native.sh` (cross-build, qemu-user)."]
    return "\n".join(lines)


def security(d: dict) -> str:
    lines = [
        f"Attempted actions against a real {d['broker']} with {d['tls']}, a password file and the per-task ACL "
        f"written by `fedhft broker config` / `fedhft device add`: {d['as_expected']} of {d['actions']} as expected.",
        "",
        "| action | expected | observed |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['action']} | {r['expected']} | {r['observed']}{'' if r['ok'] else ' **(unexpected)**'} |"
        for r in d["rows"]
    ]
    runs_in = "(the same matrix runs in `tests/scenarios/test_security_tls.py`)"
    lines += ["", f"Command: `python bench/security_table.py` {runs_in}."]
    return "\n".join(lines)


def fuzz(d: dict) -> str:
    lines = [
        f"Seeded fuzzing of the decoders (random bytes and mutations of valid messages: bit flips, truncation, "
        f"envelopes, bodies, headers, tensors): {d['tried']:,} messages, **{d['crashes']} crashes** (any exception "
        "other than the protocol's own ProtocolError).",
        "",
        "| decoder | tried | rejected | accepted | crashes | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in d["decoders"].items():
        lines.append(
            f"| {name} | {r['tried']} | {r['rejected']} | {r['accepted']} | {r['crashes']} | {r['p99_decode_ms']} |"
        )
    lines += ["", "Command: `python bench/fuzz_decoders.py`."]
    return "\n".join(lines)


def chaos(d: dict) -> str:
    c = d["config"]
    lines = [
        f"`fedhft simulate --chaos` on {c['dataset']}, {c['clients']} devices, {c['rounds']} rounds each; the same "
        "seed without chaos in the same run. Acknowledged = the server's acks seen on the wire; lost = "
        "acknowledged but absent from the server's state at the end; duplicates = updates that went into the model "
        "more than once.",
        "",
        "| run | faults injected | produced | acknowledged | aggregated | pending | lost | duplicates | "
        "accuracy | vs clean |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["methods"]:
        ch = r.get("chaos")
        if not ch:
            continue
        faults = ", ".join(f"{k} {v}" for k, v in sorted(ch["faults_injected"].items()))
        delta = ch.get("accuracy_delta_points")
        lines.append(
            f"| {r['method']} | {faults} | {ch['updates_produced']} | {ch['acknowledged']} | {ch['aggregated']} | "
            f"{ch['pending_at_end']} | **{ch['acknowledged_but_lost']}** | **{ch['duplicates_aggregated']}** | "
            f"{r['final_global_accuracy']:.3f} | {'-' if delta is None else f'{delta:+.1f} points'} |"
        )
    lines += ["", f"Command: `{c.get('command', 'python bench/simulate_compare.py --preset chaos')}`."]
    return "\n".join(lines)


def poisoning(d: dict) -> str:
    st = d["setup"]
    attacks = list(d["attacks"])
    kinds = ", ".join(f"{k} x{v}" for k, v in d["attacks"].items() if v is not None)
    lines = [
        f"{st['honest']} honest clients and {st['attackers']} attackers ({kinds}), {st['rounds']} rounds, "
        f"{d['model']}; final test accuracy of every defence against every attack in the same run.",
        "",
        "| upload mask | defence | " + " | ".join(attacks) + " |",
        "|---|---|" + "---:|" * len(attacks),
    ]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in d["results"]:
        cells.setdefault((r["mask"], r["defence"]), {})[r["attack"]] = r["final"]
    for (mask, defence), row in cells.items():
        lines.append(f"| {mask} | {defence} | " + " | ".join(f"{row.get(a, float('nan')):.3f}" for a in attacks) + " |")
    lines += ["", "Command: `python bench/poisoning.py` (a smaller run is `tests/scenarios/test_poisoning.py`)."]
    return "\n".join(lines)


def async_sweep(d: dict) -> str:
    fleet = " ".join(d["args"])
    lines = [
        "fedhft on one device of each shipped profile, one knob changed at a time from the defaults "
        f"(K {d['defaults']['buffer_size']}, server lr {d['defaults']['server_lr']}, staleness exponent "
        f"{d['defaults']['staleness_exponent']}); mean ± std over seeds; virtual clock. `fedhft simulate {fleet}`.",
        "",
        d.get("table", "(no finished run yet)"),
        "",
        "Command: `python bench/async_sweep.py`.",
    ]
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[dict], str]] = {
    "ASYNC_SWEEP": async_sweep,
    "SIMULATE_CLOTHING_RATING": simulate,
    "BACKENDS": backends,
    "ORT_MEMORY": ort_memory,
    "WIRE_BYTES": wire_bytes,
    "SERVER_INGEST": server_ingest,
    "SIMULATE": simulate,
    "SIMULATE_CLOTHING": simulate,
    "SIMULATE_BBC50": simulate,
    "SIMULATE_BBC50_CAPPED": simulate,
    "CHAOS": chaos,
    "SECURITY": security,
    "FUZZ": fuzz,
    "POISONING": poisoning,
}
FILES = {
    "ASYNC_SWEEP": "async_sweep.json",
    "SIMULATE_CLOTHING_RATING": "simulate-clothing-rating/report.json",
    "BACKENDS": "backends.json",
    "ORT_MEMORY": "ort_memory.json",
    "WIRE_BYTES": "wire_bytes.json",
    "SERVER_INGEST": "server_ingest.json",
    "SIMULATE": "simulate/report.json",
    "SIMULATE_CLOTHING": "simulate-clothing/report.json",
    "SIMULATE_BBC50": "simulate-bbc50/report.json",
    "SIMULATE_BBC50_CAPPED": "simulate-bbc50-capped/report.json",
    "CHAOS": "chaos/report.json",
    "SECURITY": "security.json",
    "FUZZ": "fuzz.json",
    "POISONING": "poisoning.json",
}


def render(readme: str) -> str:
    for key, fn in RENDERERS.items():
        path = RESULTS / FILES[key]
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        data["_dir"] = f"bench/results/{Path(FILES[key]).parent}".rstrip("/.")
        block = f"<!-- BENCH:{key} -->\n{fn(data)}\n<!-- /BENCH:{key} -->"
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
