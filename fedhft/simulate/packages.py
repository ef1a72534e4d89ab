"""The packages a simulation's devices run: one export per profile for the method, plus the evaluator's.

Every device's plan is computed here, for the whole fleet at once (:func:`method_plans`: fedavg-lora and the
no-planner ablation depend on the weakest device). Exports are cached under ``<cache>/exports/<key>`` by a
content hash of the model weights, export options, the planner, each device's plan and the fedhft version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from fedhft.device_profiles.fleet_plans import budget_rank, common_layers, device_shape, every_layer
from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import (
    DEFAULT_OBJECTIVE,
    MASK_RATIO_BY_LEVEL,
    LoraPlan,
    PlanError,
    export_formats,
    fixed_plan,
    full_finetune_plan,
    full_finetune_refusal,
    plan_lora,
    planned_runtime,
)
from fedhft.device_profiles.profile import DeviceProfile, resource_level
from fedhft.errors import FedHFTError
from fedhft.simulate.config import SimConfig, SimulationError


def _cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def method_plans(
    planner: str,
    shape: ModelShape,
    profiles: dict[str, DeviceProfile],
    max_rank: int = 16,
    objective: str = DEFAULT_OBJECTIVE,
) -> dict[str, LoraPlan | None]:
    """Each device's plan under the method's planner (methods.PLANNERS), from the same budgets; None: the
    exporter's own (full fine-tuning). PlanError when a device (or, for one shared plan, all at once) holds none:
    for full fine-tuning, when the planner's estimate of what the edge holds exceeds its memory budget.
    ``objective`` is the LEGEND planner's (capacity or memory); the baselines' fixed planners have none."""
    if planner == "full":
        for p in profiles.values():
            full = full_finetune_plan(device_shape(shape, p), p, runtime=planned_runtime(p))
            if refusal := full_finetune_refusal(full, p):
                raise PlanError(refusal)
        return {name: None for name in profiles}
    if planner == "legend":
        return {
            n: plan_lora(device_shape(shape, p), p, max_rank=max_rank, runtime=planned_runtime(p), objective=objective)
            for n, p in profiles.items()
        }
    if planner == "common":
        layers = common_layers(shape, list(profiles.values()), max_rank=max_rank)
        return {
            n: fixed_plan(
                device_shape(shape, p),
                p,
                layers,
                mask_ratio=MASK_RATIO_BY_LEVEL[resource_level(p)],
                int8=True,
                runtime=planned_runtime(p),
                max_rank=max_rank,
            )
            for n, p in profiles.items()
        }
    ranks = {n: budget_rank(shape, p, max_rank=max_rank) for n, p in profiles.items()}
    if planner == "uniform":
        ranks = dict.fromkeys(ranks, min(ranks.values()))
    elif planner != "budget-rank":
        raise SimulationError(f"unknown planner {planner!r}")
    return {
        n: fixed_plan(
            device_shape(shape, p),
            p,
            every_layer(shape, ranks[n]),
            int8=True,
            runtime=planned_runtime(p),
            max_rank=max_rank,
        )
        for n, p in profiles.items()
    }


def export_packages(cfg: SimConfig, profiles: dict[str, DeviceProfile], num_labels: int) -> tuple[dict, Path, dict]:
    """Per-profile packages for the method, plus the evaluator's; cached by content hash."""
    from fedhft.device_profiles.model_shape import read_model, resolve_model_dir
    from fedhft.export.model import weights_sha256
    from fedhft.export.pipeline import ExportOptions, export_profile
    from fedhft.protocol.manifest import load_manifest
    from fedhft.simulate.evaluator import evaluator_plan

    model_dir = resolve_model_dir(cfg.model)
    opts = ExportOptions(num_labels=num_labels, max_seq_len=cfg.max_seq_len, seed=cfg.seed, fixed_depth=None)
    m = cfg.method
    base_key = _cache_key(weights_sha256(model_dir), asdict(opts), m.planner, __import__("fedhft").__version__)
    root = cfg.cache_dir / "exports" / base_key
    dirs: dict[str, Path] = {}
    unable: dict[str, str] = {}
    plans: list[LoraPlan] = []
    shape = read_model(model_dir).shape(num_labels, cfg.max_seq_len, 8)
    usable: dict[str, DeviceProfile] = {}
    for name, prof in profiles.items():  # a device that cannot hold the method even alone stays out
        try:
            method_plans(m.planner, shape, {name: prof}, opts.max_rank, cfg.objective)
            usable[name] = prof
        except PlanError as e:
            unable[name] = str(e)
    if not usable:
        raise SimulationError(f"no profile can take part: {unable}")
    try:
        planned = method_plans(m.planner, shape, usable, opts.max_rank, cfg.objective)
    except PlanError as e:
        raise SimulationError(str(e)) from e
    for name, prof in profiles.items():
        if name in unable:
            continue
        plan = planned[name]
        formats = package_formats(cfg, prof)
        key = _cache_key(prof.to_dict(), formats, plan.to_dict() if plan else None)
        d = root / f"{prof.name}-{key}"
        if not (d / "manifest.json").is_file():
            try:
                export_profile(
                    cfg.model, prof, root, formats, opts=opts, plan=plan, name=d.name, full_finetune=plan is None
                )
            except FedHFTError as e:
                unable[name] = str(e)
                continue
        dirs[name] = d
        plans.append(LoraPlan.from_dict(load_manifest(d).plan))
    if not dirs:
        raise SimulationError(f"no profile can take part: {unable}")
    if m.planner == "full":  # every package trains the same full model: any of them evaluates it
        return dirs, dirs[next(iter(dirs))], unable
    ev_plan = evaluator_plan(plans, cfg.clusters if m.clustering else 1)
    ev_dir = root / f"evaluator-{_cache_key(ev_plan.to_dict())}"
    if not (ev_dir / "manifest.json").is_file():
        first = next(iter(profiles.values()))
        ev_opts = ExportOptions(**{**asdict(opts), "max_rank": max(opts.max_rank, ev_plan.max_rank)})
        export_profile(cfg.model, first, root, opts=ev_opts, plan=ev_plan, name=ev_dir.name)
    return dirs, ev_dir, unable


def edge_backend(cfg: SimConfig, profile: DeviceProfile) -> str:
    """The training backend a device of ``profile`` runs: ORT where the profile lists it (or ``--backend ort``),
    else the native ExecuTorch trainer, torch-free as on a Raspberry Pi (fedavg-full trains with ORT only)."""
    if cfg.backend == "ort" or cfg.method.planner == "full" or export_formats(profile) == ("ort",):
        return "ort"
    return "native"


def package_formats(cfg: SimConfig, profile: DeviceProfile) -> tuple[str, ...]:
    return ("ort",) if edge_backend(cfg, profile) == "ort" else ("executorch",)
