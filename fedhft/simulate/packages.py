"""The packages a simulation's devices run: one export per profile for the method, plus the evaluator's.

Exports are cached under ``<cache>/exports/<key>`` by a content hash of the model weights, export options,
the method's planner settings and the fedhft version, so runs of the same method share them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from fedhft.device_profiles.planner import LoraPlan, uniform_plan
from fedhft.device_profiles.profile import DeviceProfile
from fedhft.errors import FedHFTError
from fedhft.simulate.config import SimConfig, SimulationError


def _cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


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
    base_key = _cache_key(
        weights_sha256(model_dir),
        asdict(opts),
        m.planner,
        m.uniform_rank,
        m.uniform_targets,
        __import__("fedhft").__version__,
    )
    root = cfg.cache_dir / "exports" / base_key
    dirs: dict[str, Path] = {}
    unable: dict[str, str] = {}
    plans: list[LoraPlan] = []
    for name, prof in profiles.items():
        formats = package_formats(cfg, prof)
        key = _cache_key(prof.to_dict()) if formats == ("ort",) else _cache_key(prof.to_dict(), formats)
        d = root / f"{prof.name}-{key}"
        if not (d / "manifest.json").is_file():
            plan = None
            if m.planner == "uniform":
                shape = read_model(model_dir).shape(num_labels, cfg.max_seq_len, prof.batch_size)
                plan = uniform_plan(
                    shape,
                    prof,
                    rank=m.uniform_rank,
                    depth=shape.num_layers,
                    targets=m.uniform_targets,
                    int8=True,
                    runtime="ort",
                )
            o = opts if m.planner != "fixed-depth" else ExportOptions(**{**asdict(opts), "fixed_depth": 3})
            try:
                export_profile(
                    cfg.model, prof, root, formats, opts=o, plan=plan, name=d.name, full_finetune=m.planner == "full"
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
    if cfg.backend == "ort" or "ort" in profile.runtimes or cfg.method.planner == "full":
        return "ort"
    return "native"


def package_formats(cfg: SimConfig, profile: DeviceProfile) -> tuple[str, ...]:
    return ("ort",) if edge_backend(cfg, profile) == "ort" else ("executorch",)
