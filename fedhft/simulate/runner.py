"""Run one federated simulation: export per profile, broker, server, N edge runtimes, evaluator, report.

Every part is the real one: artifacts from the export pipeline, a real MQTT broker, the server and the edge
runtimes as separate processes (`fedhft server run`, `fedhft edge run`) exchanging real protocol messages.
Devices differ in time through scaled sleeps: each edge runtime turns its profile's planned step time and
link speeds into a simulated duration per round and sleeps that duration times `time_scale` (see
`fedhft edge run --sim-time-scale`); simulated time is carried in update metrics and model meta.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedhft.device_profiles.planner import LoraPlan, uniform_plan
from fedhft.device_profiles.profile import DeviceProfile, load_profile
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.procs import stop_process
from fedhft.simulate.data import FederatedSplit, dirichlet_split, load_dataset
from fedhft.simulate.methods import MethodSpec

log = logging.getLogger("fedhft.simulate")


class SimulationError(FedHFTError):
    """The simulation cannot run."""


@dataclass
class SimConfig:
    clients: int
    profiles: dict[str, int]
    dataset: str
    alpha: float
    rounds: int
    method: MethodSpec
    out: Path
    model: str | None = None
    broker: str | None = None
    target_accuracy: float | None = None
    minutes: float | None = None
    seed: int = 0
    local_steps: int = 10
    max_seq_len: int = 64
    learning_rate: float = 2e-3
    time_scale: float = 0.0
    clusters: int = 2
    cache_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("FEDHFT_CACHE", Path.home() / ".cache" / "fedhft"))
    )


def parse_profile_mix(text: str) -> dict[str, int]:
    """'rpi4-4gb:4,laptop-x86-16gb:2' -> {name: count}."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        try:
            mix[name] = mix.get(name, 0) + (int(count) if count else 1)
        except ValueError as e:
            raise SimulationError(f"--profiles: '{part}' is not NAME:COUNT") from e
    if not mix:
        raise SimulationError("--profiles is empty")
    return mix


def _python() -> list[str]:
    return [sys.executable, "-m", "fedhft.cli"]


def _cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def export_packages(cfg: SimConfig, profiles: dict[str, DeviceProfile], num_labels: int) -> tuple[dict, Path, dict]:
    """Per-profile packages for the method, plus the evaluator's; cached by content hash."""
    from fedhft.export.model import resolve_model_dir, weights_sha256
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
        key = _cache_key(prof.to_dict())
        d = root / f"{prof.name}-{key}"
        if not (d / "manifest.json").is_file():
            plan = None
            if m.planner == "uniform":
                from fedhft.export.model import load_encoder, model_shape

                shape = model_shape(load_encoder(model_dir), num_labels, cfg.max_seq_len, prof.batch_size)
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
                export_profile(cfg.model, prof, root, opts=o, plan=plan, name=d.name)
            except FedHFTError as e:
                unable[name] = str(e)
                continue
        dirs[name] = d
        plans.append(LoraPlan.from_dict(load_manifest(d).plan))
    if not dirs:
        raise SimulationError(f"no profile can take part: {unable}")
    ev_plan = evaluator_plan(plans)
    ev_dir = root / f"evaluator-{_cache_key(ev_plan.to_dict())}"
    if not (ev_dir / "manifest.json").is_file():
        first = next(iter(profiles.values()))
        export_profile(cfg.model, first, root, opts=opts, plan=ev_plan, name=ev_dir.name)
    return dirs, ev_dir, unable


def write_client_data(out: Path, texts: list[str], labels: np.ndarray, idx: np.ndarray) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in idx:
            f.write(json.dumps({"text": texts[int(i)], "label": int(labels[int(i)])}) + "\n")
    return out


def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(cfg: SimConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run one method end to end and return its report entry (also written to OUT/<method>/result.json)."""
    from fedhft.broker_server.broker import EmbeddedBroker
    from fedhft.simulate.evaluator import Evaluator
    from fedhft.simulate.traffic import TrafficCounter

    say = progress or (lambda _s: None)
    if sum(cfg.profiles.values()) != cfg.clients:
        raise SimulationError(f"--profiles counts sum to {sum(cfg.profiles.values())}, --clients is {cfg.clients}")
    data = load_dataset(cfg.dataset)
    labels = np.asarray(data.labels)
    split: FederatedSplit = dirichlet_split(labels, cfg.clients, cfg.alpha, cfg.seed)
    profiles = {name: load_profile(name) for name in cfg.profiles}
    say(f"exporting {len(profiles)} profile(s) for {cfg.method.name} (cached) ...")
    dirs, ev_dir, unable = export_packages(cfg, profiles, data.num_labels)
    run_dir = cfg.out / cfg.method.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    assignment = [name for name, n in cfg.profiles.items() for _ in range(n)]
    task = f"sim-{cfg.method.name}-{cfg.seed}".replace("_", "-")
    broker = EmbeddedBroker(port=0).start() if cfg.broker is None else None
    url = cfg.broker or broker.url  # type: ignore[union-attr]
    procs: dict[str, subprocess.Popen] = {}
    server = None
    traffic = evaluator = None
    peaks: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        traffic = TrafficCounter(url, task).start()
        state = run_dir / "server"
        manifest = dirs[next(iter(dirs))] / "manifest.json"
        m = cfg.method
        n_active = sum(1 for p in assignment if p in dirs)
        buffer = n_active if m.synchronous else max(2, n_active // 2)
        window = 3600.0 if m.synchronous else 20.0
        server_cmd = [
            *_python(),
            "server",
            "run",
            "--broker",
            url,
            "--task",
            task,
            "--state",
            str(state),
            "--manifest",
            str(manifest),
            "--buffer-size",
            str(buffer),
            "--window-seconds",
            str(window),
            "--clusters",
            str(cfg.clusters if m.clustering else 1),
            "--warmup-aggregations",
            "2",
            "--staleness-exponent",
            "0" if m.synchronous else "0.5",
            "--seed",
            str(cfg.seed),
            "--aggregator",
            m.aggregator,
            *m.server_args,
        ]
        server = subprocess.Popen(server_cmd, stdout=open(run_dir / "server.log", "w"), stderr=subprocess.STDOUT)
        pub = state / "server_key.pub"
        deadline = time.monotonic() + 60
        while not pub.is_file():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SimulationError(f"the server did not start: {(run_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        texts = data.texts
        evaluator = Evaluator(
            url, task, str(ev_dir), [texts[i] for i in split.global_test], labels[split.global_test]
        ).start()
        label_arg = ",".join(str(i) for i in range(data.num_labels))
        for c, prof in zip(split.clients, assignment, strict=True):
            cid = f"c{c.client:03d}"
            if prof not in dirs:
                continue
            cdir = run_dir / "clients" / cid
            train = write_client_data(cdir / "train.jsonl", texts, labels, c.train)
            test = write_client_data(cdir / "test.jsonl", texts, labels, c.test)
            cmd = [
                *_python(),
                "edge",
                "run",
                "--artifacts",
                str(dirs[prof]),
                "--data",
                str(train),
                "--broker",
                url,
                "--task",
                task,
                "--client-id",
                cid,
                "--state-dir",
                str(cdir / "state"),
                "--server-key",
                str(pub),
                "--rounds",
                str(cfg.rounds),
                "--local-steps",
                str(cfg.local_steps),
                "--lr",
                str(cfg.learning_rate),
                "--seed",
                str(cfg.seed + c.client),
                "--labels",
                label_arg,
                "--eval-data",
                str(test),
                "--sim-time-scale",
                str(cfg.time_scale),
            ]
            if not m.mask:
                cmd += ["--mask-ratio", "1.0"]
            procs[cid] = subprocess.Popen(cmd, stdout=open(cdir / "edge.log", "w"), stderr=subprocess.STDOUT)
        limit = (cfg.minutes or 60.0) * 60
        while any(p.poll() is None for p in procs.values()):
            for cid, p in procs.items():
                rss = _peak_rss_mb(p.pid)
                if rss:
                    peaks[cid] = max(peaks.get(cid, 0.0), rss)
            elapsed = time.monotonic() - t0
            snap = traffic.snapshot()
            acc = evaluator.latest_accuracy()
            version = max((pt.version for pt in evaluator.points), default=0)
            say(
                f"[{m.name}] {elapsed:5.0f}s  version {version:3d}  "
                f"accuracy {acc if acc is None else round(acc, 3)}  up {snap['bytes'].get('update', 0) / 1e3:.0f} kB  "
                f"down {snap['bytes'].get('model/client', 0) / 1e3:.0f} kB  "
                f"active {sum(p.poll() is None for p in procs.values())}"
            )
            if elapsed > limit:
                event(log, "time limit reached", logging.WARNING, minutes=cfg.minutes)
                break
            if cfg.target_accuracy and acc is not None and acc >= cfg.target_accuracy and cfg.minutes:
                break
            time.sleep(2.0)
        time.sleep(3.0)  # the last aggregation and its models
        evaluator.drain()
    finally:
        for p in procs.values():
            stop_process(p, grace=20)
        if server is not None:
            stop_process(server, grace=20)
        if evaluator is not None:
            evaluator.stop()
        if traffic is not None:
            traffic.stop()
        if broker is not None:
            broker.stop()
    from fedhft.simulate.report import method_result

    result = method_result(cfg, run_dir, assignment, dirs, unable, evaluator, traffic, peaks, time.monotonic() - t0)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
