"""The product's goals for a comparison, measured from its summary: fedhft against the best baseline in accuracy,
macro-F1 and personalized accuracy, against fedavg-lora in upload bytes and virtual time to the target, and against
its no-clustering ablation. Each comparison uses the means over the seeds both methods ran. Only the goals the
report's methods allow are listed."""

from __future__ import annotations

from typing import Any

from fedhft.simulate.summary import paired_means


def is_baseline(method: str) -> bool:
    """A clean run of a method that is not fedhft or one of its ablations (fedhft-no-*)."""
    return "+" not in method and not method.startswith("fedhft")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 1)


def _seeds(seeds: list[int]) -> str:
    return f"mean of {len(seeds)} common seed(s): {', '.join(map(str, seeds))}" if seeds else "no common seed"


def goals(report: dict) -> list[dict[str, Any]]:
    summary = report.get("summary") or []
    by = {s["method"]: s for s in summary}
    fh, lora, full, flat = (by.get(m) for m in ("fedhft", "fedavg-lora", "fedavg-full", "fedhft-no-clustering"))
    out: list[dict[str, Any]] = []

    def add(goal: str, measured: float | None, need: float, note: str) -> None:
        met = measured is not None and measured >= need
        out.append({"goal": goal, "measured": measured, "need": need, "met": met, "note": note})

    baselines = [s for s in summary if is_baseline(s["method"])]
    if fh and baselines:
        for name, figure, need in (
            ("global accuracy", "final_global_accuracy", -0.5),
            ("global macro-F1", "final_global_macro_f1", -0.5),
            ("personalized accuracy", "mean_personalized_accuracy", 2.0),
        ):
            pairs = [(paired_means(fh, s, figure), s["method"]) for s in baselines]
            scored = [(b, a, seeds, m) for (a, b, seeds), m in pairs if a is not None and b is not None]
            best = max(scored, default=(None, None, [], "-"))
            add(
                f"{name}, fedhft − best baseline (points)",
                _points(best[1], best[0]),
                need,
                f"best baseline {best[3]}; {_seeds(best[2])}",
            )
    if fh and lora:
        target = next((r.get("target_accuracy") for r in report.get("methods", [])), None)
        b_lora, b_fh, seeds = paired_means(lora, fh, "bytes_up_to_target")
        add(
            "upload bytes to target, fedavg-lora ÷ fedhft",
            _ratio(b_lora, b_fh),
            3.0,
            f"target accuracy {target}; '-' when a method missed it in some seed; {_seeds(seeds)}",
        )
        t_lora, t_fh, seeds = paired_means(lora, fh, "simulated_seconds_to_target")
        add(
            "simulated time to target, fedavg-lora ÷ fedhft",
            _ratio(t_lora, t_fh),
            2.5,
            f"heterogeneous devices, virtual clock; {_seeds(seeds)}",
        )
    if fh and full:
        u_full, u_fh, seeds = paired_means(full, fh, "bytes_up_per_client_round")
        add("upload per client-round, fedavg-full ÷ fedhft", _ratio(u_full, u_fh), 500.0, _seeds(seeds))
    if fh and flat:
        p_fh, p_flat, seeds = paired_means(fh, flat, "mean_personalized_accuracy")
        add(
            "personalized accuracy, with clustering − without (points)",
            _points(p_fh, p_flat),
            0.0,
            f"alpha {report.get('config', {}).get('alpha')}; {_seeds(seeds)}",
        )
    return out
