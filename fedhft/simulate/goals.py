"""The product's goals for a comparison, measured from its summary (means over seeds): fedhft against the best
baseline in accuracy, macro-F1 and personalized accuracy, and against fedavg-lora in upload bytes and virtual
time to the target. Only the goals the report's methods allow are listed."""

from __future__ import annotations

from typing import Any

from fedhft.simulate.summary import mean_of


def is_baseline(method: str) -> bool:
    """A clean run of a method that is not fedhft or one of its ablations (fedhft-no-*)."""
    return "+" not in method and not method.startswith("fedhft")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 1)


def goals(report: dict) -> list[dict[str, Any]]:
    summary = report.get("summary") or []
    by = {s["method"]: s for s in summary}
    fh, lora, full, flat = (by.get(m) for m in ("fedhft", "fedavg-lora", "fedavg-full", "fedhft-no-clustering"))
    seeds = f"mean of {len(fh['seeds'])} seed(s)" if fh else ""
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
            scored = [(mean_of(s, figure), s["method"]) for s in baselines if mean_of(s, figure) is not None]
            best = max(scored, default=(None, "-"))
            add(
                f"{name}, fedhft − best baseline (points)",
                _points(mean_of(fh, figure), best[0]),
                need,
                f"best baseline {best[1]}; {seeds}",
            )
    if fh and lora:
        target = next((r.get("target_accuracy") for r in report.get("methods", [])), None)
        add(
            "upload bytes to target, fedavg-lora ÷ fedhft",
            _ratio(mean_of(lora, "bytes_up_to_target"), mean_of(fh, "bytes_up_to_target")),
            3.0,
            f"target accuracy {target}; '-' when a method missed it in some seed; {seeds}",
        )
        add(
            "simulated time to target, fedavg-lora ÷ fedhft",
            _ratio(mean_of(lora, "simulated_seconds_to_target"), mean_of(fh, "simulated_seconds_to_target")),
            2.5,
            f"heterogeneous devices, virtual clock; {seeds}",
        )
    if fh and full:
        add(
            "upload per client-round, fedavg-full ÷ fedhft",
            _ratio(mean_of(full, "bytes_up_per_client_round"), mean_of(fh, "bytes_up_per_client_round")),
            500.0,
            seeds,
        )
    if fh and flat:
        add(
            "personalized accuracy, with clustering − without (points)",
            _points(mean_of(fh, "mean_personalized_accuracy"), mean_of(flat, "mean_personalized_accuracy")),
            0.0,
            f"alpha {report.get('config', {}).get('alpha')}; {seeds}",
        )
    return out
