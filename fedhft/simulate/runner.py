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

from fedhft.datasets import TextDataset
from fedhft.device_profiles.planner import LoraPlan, uniform_plan
from fedhft.device_profiles.profile import DeviceProfile, load_profile
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.procs import stop_process
from fedhft.simulate.data import (
    ClientSplit,
    FederatedSplit,
    cap_test_sets,
    dirichlet_split,
    load_dataset,
    natural_split,
)
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
    split: str = "dirichlet"  # "dirichlet" (label skew by alpha) | "natural" (the data set's groups)
    chaos: str | None = None  # a fault spec (fedhft.simulate.chaos): the run is named <method>+chaos
    backend: str = "auto"  # "auto": each profile's own runtime (ORT, else the native ExecuTorch trainer) | "ort"
    max_test: int | None = 1000  # global test cap; each client's test split is capped at a fifth of it
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


def make_split(data: TextDataset, cfg: SimConfig) -> FederatedSplit:
    """The clients' data: Dirichlet label skew or the data set's natural groups; test sets capped."""
    if cfg.split == "natural":
        if data.groups is None:
            raise SimulationError(f"--split natural: data set {data.name!r} has no natural groups")
        split = natural_split(data.groups, cfg.clients, cfg.seed)
    elif cfg.split == "dirichlet":
        split = dirichlet_split(np.asarray(data.labels), cfg.clients, cfg.alpha, cfg.seed)
    else:
        raise SimulationError(f"unknown --split {cfg.split!r}: dirichlet or natural")
    cap = cfg.max_test
    return cap_test_sets(split, cfg.seed, cap, None if cap is None else max(20, cap // 5))


def edge_backend(cfg: SimConfig, profile: DeviceProfile) -> str:
    """The training backend a device of ``profile`` runs: ORT where the profile lists it (or ``--backend ort``),
    else the native ExecuTorch trainer, torch-free as on a Raspberry Pi (fedavg-full trains with ORT only)."""
    if cfg.backend == "ort" or "ort" in profile.runtimes or cfg.method.planner == "full":
        return "ort"
    return "native"


def package_formats(cfg: SimConfig, profile: DeviceProfile) -> tuple[str, ...]:
    return ("ort",) if edge_backend(cfg, profile) == "ort" else ("executorch",)


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


@dataclass
class Fleet:
    """The run's child processes (server and edges) with their commands, so chaos can kill and restart them."""

    run_dir: Path
    server_cmd: list[str]
    edge_cmds: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # "server" and client ids
    restart_at: dict[str, float] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)  # client id -> exit code of an edge that gave up
    restarts: int = 0

    def _log(self, name: str) -> Path:
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


def run(cfg: SimConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run one method end to end and return its report entry (also written to OUT/<method>/result.json)."""
    from fedhft.broker_server.broker import EmbeddedBroker
    from fedhft.simulate.evaluator import ClientSplit, Evaluator
    from fedhft.simulate.traffic import TrafficCounter

    say = progress or (lambda _s: None)
    if sum(cfg.profiles.values()) != cfg.clients:
        raise SimulationError(f"--profiles counts sum to {sum(cfg.profiles.values())}, --clients is {cfg.clients}")
    data = load_dataset(cfg.dataset)
    labels = np.asarray(data.labels)
    split = make_split(data, cfg)
    profiles = {name: load_profile(name) for name in cfg.profiles}
    say(f"exporting {len(profiles)} profile(s) for {cfg.method.name} (cached) ...")
    dirs, ev_dir, unable = export_packages(cfg, profiles, data.num_labels)
    label = cfg.method.name + ("+chaos" if cfg.chaos else "")
    run_dir = cfg.out / label
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    assignment = [prof for prof, n in cfg.profiles.items() for _ in range(n)]
    task = f"sim-{cfg.method.name}-{cfg.seed}".replace("_", "-")
    broker = None
    if cfg.broker is None:
        broker = EmbeddedBroker(port=0, persistent=bool(cfg.chaos)).start()
    url = cfg.broker or broker.url  # type: ignore[union-attr]
    state = run_dir / "server"
    n_active = sum(1 for p in assignment if p in dirs)
    fleet = Fleet(run_dir, server_command(cfg, url, task, state, dirs[next(iter(dirs))] / "manifest.json", n_active))
    traffic = evaluator = chaos = None
    peaks: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        traffic = TrafficCounter(url, task).start()
        fleet.start("server")
        pub = state / "server_key.pub"
        deadline = time.monotonic() + 60
        while not pub.is_file():
            if fleet.procs["server"].poll() is not None or time.monotonic() > deadline:
                raise SimulationError(f"the server did not start: {(run_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        texts = data.texts
        client_splits = {
            f"c{c.client:03d}": ClientSplit([texts[i] for i in c.test], labels[c.test]) for c in split.clients
        }
        evaluator = Evaluator(
            url, task, str(ev_dir), [texts[i] for i in split.global_test], labels[split.global_test], client_splits
        ).start()
        label_arg = ",".join(str(i) for i in range(data.num_labels))
        for c, prof in zip(split.clients, assignment, strict=True):
            cid = f"c{c.client:03d}"
            if prof not in dirs:
                continue
            cdir = run_dir / "clients" / cid
            train = write_client_data(cdir / "train.jsonl", texts, labels, c.train)
            test = write_client_data(cdir / "test.jsonl", texts, labels, c.test)
            fleet.edge_cmds[cid] = edge_command(cfg, dirs[prof], train, test, url, task, cid, cdir, pub, label_arg, c)
            fleet.edge_cmds[cid] += ["--backend", edge_backend(cfg, profiles[prof])]
            fleet.start(cid)
        if cfg.chaos:
            chaos = start_chaos(cfg, fleet, broker, url, task)
        chaos_t0 = time.monotonic()  # the fault schedule counts from here: the whole fleet is running
        limit = (cfg.minutes or 60.0) * 60
        while fleet.edges_active() or (chaos is not None and fleet.restart_at):
            elapsed = time.monotonic() - t0
            if chaos is not None:
                chaos.tick(time.monotonic() - chaos_t0)
            fleet.supervise()
            for cid, p in fleet.procs.items():
                rss = _peak_rss_mb(p.pid) if cid != "server" and p.poll() is None else None
                if rss:
                    peaks[cid] = max(peaks.get(cid, 0.0), rss)
            snap = traffic.snapshot()
            acc = evaluator.latest_accuracy()
            version = max((pt.version for pt in evaluator.points), default=0)
            faults = f"  faults {sum(chaos.injected.values())}" if chaos is not None else ""
            say(
                f"[{label}] {elapsed:5.0f}s  version {version:3d}  "
                f"accuracy {acc if acc is None else round(acc, 3)}  up {snap['bytes'].get('update', 0) / 1e3:.0f} kB  "
                f"down {snap['bytes'].get('model/client', 0) / 1e3:.0f} kB  "
                f"active {len(fleet.running_edges())}{faults}"
            )
            if elapsed > limit:
                event(log, "time limit reached", logging.WARNING, minutes=cfg.minutes)
                break
            if cfg.target_accuracy and acc is not None and acc >= cfg.target_accuracy and cfg.minutes:
                break
            time.sleep(1.0)
        time.sleep(3.0)  # the last aggregation and its models
        evaluator.drain()
        say(f"[{label}] evaluating {len(client_splits)} personalized models on their clients' test splits ...")
        evaluator.evaluate_clients()
    finally:
        fleet.stop()
        for part in (chaos.injector if chaos is not None else None, evaluator, traffic, broker):
            if part is not None:
                part.stop()
    from fedhft.simulate.report import method_result

    result = method_result(cfg, run_dir, assignment, dirs, unable, evaluator, traffic, peaks, time.monotonic() - t0)
    result["method"] = label
    result["edges_failed"] = dict(fleet.failed)
    result["backend_by_profile"] = {prof: edge_backend(cfg, profiles[prof]) for prof in dirs}
    if chaos is not None:
        from fedhft.simulate.chaos import state_accounting

        produced = {(u["client"], int(u["seq"])) for u in traffic.updates}  # type: ignore[union-attr]
        result["chaos"] = {
            "spec": cfg.chaos,
            "faults_injected": dict(chaos.injected),
            "faults_skipped": dict(chaos.skipped),
            "faults_not_reached": chaos.pending(),
            "restarts": fleet.restarts,
            "fault_log": chaos.log,
            **state_accounting(state / "state.sqlite3", produced, set(traffic.acked)),  # type: ignore[union-attr]
        }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def with_clean_reference(faulty: dict, clean: dict) -> dict:
    """A chaos result with the same-seed clean run's final accuracy and the difference."""
    a, b = faulty.get("final_global_accuracy"), clean.get("final_global_accuracy")
    chaos = dict(faulty.get("chaos", {}))
    chaos["clean_final_accuracy"] = b
    chaos["accuracy_delta_points"] = None if a is None or b is None else round(100 * (a - b), 2)
    return dict(faulty, chaos=chaos)


def server_command(cfg: SimConfig, url: str, task: str, state: Path, manifest: Path, n_active: int) -> list[str]:
    m = cfg.method
    buffer = n_active if m.synchronous else max(2, n_active // 2)
    window = 3600.0 if m.synchronous else 20.0
    return [
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


def edge_command(
    cfg: SimConfig,
    package: Path,
    train: Path,
    test: Path,
    url: str,
    task: str,
    cid: str,
    cdir: Path,
    pub: Path,
    label_arg: str,
    client: ClientSplit,
) -> list[str]:
    cmd = [
        *_python(),
        "edge",
        "run",
        "--artifacts",
        str(package),
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
        str(cfg.method.learning_rate or cfg.learning_rate),
        "--seed",
        str(cfg.seed + client.client),
        "--labels",
        label_arg,
        "--eval-data",
        str(test),
        "--sim-time-scale",
        str(cfg.time_scale),
        "--ack-timeout",  # a simulated fleet runs minutes, not days: re-send an unacknowledged update sooner
        "20",
    ]
    if not cfg.method.mask and cfg.method.planner != "full":
        cmd += ["--mask-ratio", "1.0"]
    return cmd


def start_chaos(cfg: SimConfig, fleet: Fleet, broker: object | None, url: str, task: str):  # -> Chaos
    """The fault injector for --chaos, wired to this run's fleet and broker."""
    from fedhft.simulate.chaos import Chaos, ChaosSpec, Injector

    spec = ChaosSpec.parse(cfg.chaos or "")

    def kill_edge(rng) -> str | None:  # noqa: ANN001
        running = fleet.running_edges()
        if not running:
            return None
        cid = rng.choice(running)
        return cid if fleet.kill(cid, spec.restart_delay) else None

    def restart_broker() -> bool:
        if broker is None:
            return False  # an external broker (--broker) is not ours to restart
        broker.restart(down_seconds=1.0)  # type: ignore[attr-defined]
        return True

    def drop_target(rng) -> str | None:  # noqa: ANN001
        running = fleet.running_edges()
        return f"fedhft-{task}-{rng.choice(running)}" if running else None

    injector = Injector(url, task, cfg.seed).start()
    return Chaos(
        spec,
        cfg.seed,
        injector,
        kill_edge=kill_edge,
        kill_server=lambda: fleet.kill("server", spec.restart_delay),
        restart_broker=restart_broker,
        drop_target=drop_target,
    )
