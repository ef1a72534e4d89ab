"""Run one federated simulation: export per profile, broker, server, N edge runtimes, evaluator, report.

The run loop is here; the packages come from packages.py, the processes' command lines from commands.py,
and the processes are kept by fleet.py.

Every part is the real one: artifacts from the export pipeline, a real MQTT broker, the server and the edge
runtimes as separate processes (`fedhft server run`, `fedhft edge run`) exchanging real protocol messages.
Devices differ in time on a virtual clock (the default): each edge turns its profile's planned step time and
link speeds into the virtual duration of a round and promises when its update lands; the server orders
updates by those times and schedules each device's next round. Nobody sleeps, and the same seeds give the
same numbers whatever the host load; time to target is read off that clock (model meta ``virtual_time``).
The run ends when every edge has been scheduled past version --rounds or the --virtual-budget. With
``virtual_time`` off (`--wall-clock`), edges sleep `time_scale` x their simulated round time instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedhft.datasets import TextDataset
from fedhft.device_profiles.profile import load_profile
from fedhft.logs import event
from fedhft.simulate.commands import edge_options, server_command
from fedhft.simulate.config import DEFAULT_ENCODING, SimConfig, SimulationError, host_count
from fedhft.simulate.data import FederatedSplit, cap_test_sets, dirichlet_split, load_dataset, natural_split
from fedhft.simulate.fleet import Fleet, peak_rss_mb
from fedhft.simulate.flush_mix import profile_shares, read_flushes
from fedhft.simulate.packages import edge_backend, export_packages
from fedhft.simulate.reference import reference

log = logging.getLogger("fedhft.simulate")
PROGRESS_EVERY = 30.0  # seconds between progress lines when nothing changed


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


def write_client_data(out: Path, texts: list[str], labels: np.ndarray, idx: np.ndarray) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in idx:
            f.write(json.dumps({"text": texts[int(i)], "label": int(labels[int(i)])}) + "\n")
    return out


def wall_limit_minutes(cfg: SimConfig) -> float:
    """The wall-time limit of one run: --minutes, else 60 on the wall clock and 480 on the virtual clock, where a
    run ends at its versions or virtual budget and the limit only guards against a hung fleet."""
    if cfg.minutes:
        return cfg.minutes
    return 480.0 if cfg.virtual_time else 60.0


def run(cfg: SimConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run one method end to end and return its report entry (also written to OUT/<method>/result.json)."""
    from fedhft.broker_server.broker.embedded import EmbeddedBroker
    from fedhft.simulate.evaluator import ClientSplit, Evaluator
    from fedhft.simulate.traffic import TrafficCounter

    say = progress or (lambda _s: None)
    if sum(cfg.profiles.values()) != cfg.clients:
        raise SimulationError(f"--profiles counts sum to {sum(cfg.profiles.values())}, --clients is {cfg.clients}")
    data = load_dataset(cfg.dataset, cfg.group_column)
    labels = np.asarray(data.labels)
    split = make_split(data, cfg)
    profiles = {name: load_profile(name) for name in cfg.profiles}
    say(f"exporting {len(profiles)} profile(s) for {cfg.method.name} (cached) ...")
    dirs, ev_dir, unable = export_packages(cfg, profiles, data.num_labels)
    label = cfg.label
    run_dir = cfg.out / label
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    assignment = [prof for prof, n in cfg.profiles.items() for _ in range(n)]
    task = f"sim-{cfg.method.name}{'' if cfg.encoding == DEFAULT_ENCODING else '-' + cfg.encoding}-{cfg.seed}"
    task = task.replace("_", "-")
    broker = None
    if cfg.broker is None:
        broker = EmbeddedBroker(port=0, persistent=bool(cfg.chaos)).start()
    url = cfg.broker or broker.url  # type: ignore[union-attr]
    state = run_dir / "server"
    n_active = sum(1 for p in assignment if p in dirs)
    hosts = host_count(cfg, n_active)
    say(f"[{label}] {n_active} devices: " + (f"{hosts} host process(es)" if hosts else "one process each"))
    fleet = Fleet(run_dir, server_command(cfg, url, task, state, dirs[next(iter(dirs))] / "manifest.json", n_active))
    traffic = evaluator = chaos = None
    peaks: dict[str, float] = {}
    t0 = time.monotonic()
    stopped_at_limit = False
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
        devices: dict[str, dict[str, object]] = {}  # client id -> its `fedhft edge run` options
        for c, prof in zip(split.clients, assignment, strict=True):
            cid = f"c{c.client:03d}"
            if prof not in dirs:
                continue
            cdir = run_dir / "clients" / cid
            train = write_client_data(cdir / "train.jsonl", texts, labels, c.train)
            test = write_client_data(cdir / "test.jsonl", texts, labels, c.test)
            devices[cid] = edge_options(cfg, dirs[prof], train, test, url, task, cid, cdir, pub, label_arg, c)
            devices[cid]["backend"] = edge_backend(cfg, profiles[prof])
        fleet.add_edges(devices, hosts)
        for name in fleet.edge_cmds:
            fleet.start(name)
        if cfg.chaos:
            chaos = start_chaos(cfg, fleet, broker, url, task)
        chaos_t0 = time.monotonic()  # the fault schedule counts from here: the whole fleet is running
        limit = wall_limit_minutes(cfg) * 60
        shown, shown_at = None, 0.0  # the last progress line's state and time
        while fleet.edges_active() or (chaos is not None and fleet.restart_at):
            elapsed = time.monotonic() - t0
            if chaos is not None:
                chaos.tick(time.monotonic() - chaos_t0)
            fleet.supervise()
            for name, p in fleet.procs.items():
                rss = peak_rss_mb(p.pid) if name != "server" and p.poll() is None else None
                if rss:
                    peaks[name] = max(peaks.get(name, 0.0), rss)
            snap = traffic.snapshot()
            acc = evaluator.latest_accuracy()
            version = max((pt.version for pt in evaluator.points), default=0)
            vt = max((pt.virtual_time for pt in evaluator.points), default=0.0)
            faults = f"  faults {sum(chaos.injected.values())}" if chaos is not None else ""
            now = (version, len(fleet.running_edges()), faults)
            if now != shown or elapsed - shown_at >= PROGRESS_EVERY:  # a line when something changed
                shown, shown_at = now, elapsed
                say(
                    f"[{label}] {elapsed:5.0f}s  version {version:3d}  virtual {vt:7.0f}s  "
                    f"accuracy {acc if acc is None else round(acc, 3)}  "
                    f"up {snap['bytes'].get('update', 0) / 1e3:.0f} kB  "
                    f"down {snap['bytes'].get('model/client', 0) / 1e3:.0f} kB  active {now[1]}{faults}"
                )
            if elapsed > limit:
                stopped_at_limit = True
                event(log, "wall-time limit reached: the run is cut short", logging.WARNING, minutes=limit / 60)
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

    per_device = {name: mb for name, mb in peaks.items() if name not in fleet.members}  # hosts: by host below
    result = method_result(
        cfg, run_dir, assignment, dirs, unable, evaluator, traffic, per_device, time.monotonic() - t0
    )
    result["method"] = label
    result["wall_limit_minutes"] = wall_limit_minutes(cfg)
    result["stopped_at_wall_limit"] = stopped_at_limit  # cut short by the host's speed, not by the run's end
    result["edges_failed"] = dict(fleet.failed)
    if hosts:
        result["hosts"] = hosts
        result["peak_rss_mb_by_host"] = {h: round(mb, 1) for h, mb in sorted(peaks.items()) if h in fleet.members}
    result["backend_by_profile"] = {prof: edge_backend(cfg, profiles[prof]) for prof in dirs}
    result["reference"] = reference(labels, split)
    profile_of = {f"c{i:03d}": p for i, p in enumerate(assignment)}
    result["flushes"] = read_flushes(state / "state.sqlite3", profile_of)
    result["updates_by_profile"] = profile_shares(result["flushes"])
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
