"""`fedhft simulate` end to end on a tiny model: real broker, server and edge processes, real MQTT traffic."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.protocol.mqtt import make_client

WORDS = {
    0: "football match goal striker league cup",
    1: "shares market profit bank economy stocks",
    2: "election minister vote parliament party law",
    3: "film actor music award album director",
}
FIELDS = (
    "method final_global_accuracy final_global_macro_f1 mean_personalized_accuracy accuracy_curve bytes_up "
    "bytes_down updates bytes_up_per_client_round bytes_down_per_client_round simulated_seconds_to_target "
    "wall_seconds_to_target bytes_up_to_target peak_rss_mb_by_profile unable_to_participate"
).split()


def _dataset(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            y = i % 4
            words = WORDS[y].split()
            text = " ".join(rng.choice(words, size=6)) + " the of and a"
            f.write(json.dumps({"text": text, "label": f"topic{y}"}) + "\n")
    return path


class Sniffer:
    """A plain subscriber on the task's topics: counts update bytes independently of fedhft."""

    def __init__(self, port: int) -> None:
        self.bytes: Counter = Counter()
        self.ready = threading.Event()
        self.c = make_client()
        self.c.on_message = lambda _c, _u, m: self.bytes.update({m.topic.split("/")[3]: len(m.payload)})
        self.c.on_subscribe = lambda *_a: self.ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe("fedhft/v1/+/update/+", qos=1)
        assert self.ready.wait(10)

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.slow
def test_simulate_tiny_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl")
    sniffer = Sniffer(mosquitto.port)
    try:
        r = CliRunner().invoke(
            main,
            [
                "simulate",
                "--clients",
                "3",
                "--profiles",
                f"{tiny_profile_path}:3",
                "--dataset",
                str(data),
                "--alpha",
                "1.0",
                "--rounds",
                "3",
                "--local-steps",
                "8",
                "--max-seq-len",
                "16",
                "--lr",
                "0.01",
                "--model",
                str(tiny_model_dir),
                "--out",
                str(tmp_path / "out"),
                "--broker",
                mosquitto.url,
                "--time-scale",
                "0",
                "--minutes",
                "4",
                "--target-accuracy",
                "0.5",
                "--clusters",
                "1",
            ],
        )
    finally:
        sniffer.stop()
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (res,) = report["methods"]
    for key in FIELDS:
        assert key in res, key
    assert res["updates"] >= 6, res["updates"]
    assert res["stopped_at_wall_limit"] is False and res["wall_limit_minutes"] == 4  # it ended at its versions
    assert res["final_global_accuracy"] is not None and res["final_global_accuracy"] > 0.4, res["accuracy_curve"]
    assert res["bytes_up"] == sniffer.bytes["update"], (res["bytes_up"], sniffer.bytes)
    assert res["bytes_up_per_client_round"] > 0 and res["bytes_down"] > 0
    ref = res["reference"]  # what answering without a model scores on the same test sets
    assert 0 < ref["global_accuracy"] < 1 and ref["personalized_accuracy"] is not None
    assert report["reference"]["seeds"] == [0]
    # every aggregated update is counted in its version's mix, all from the one profile
    assert sum(n for f in res["flushes"].values() for n in f["updates"].values()) >= 6
    assert list(res["updates_by_profile"].values()) == [1.0]
    out = CliRunner().invoke(main, ["report", str(tmp_path / "out")])
    assert out.exit_code == 0 and "fedhft" in out.output and "no model (1 seed)" in out.output


@pytest.mark.slow
def test_simulate_baselines_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl", n=200)
    args = "simulate --clients 2 --alpha 1.0 --rounds 2 --local-steps 4 --max-seq-len 16 --lr 0.01 --time-scale 0"
    args += " --minutes 3 --method fedavg-lora,flexlora,fedavg-full"
    paths = ["--profiles", f"{tiny_profile_path}:2", "--dataset", str(data), "--model", str(tiny_model_dir)]
    paths += ["--out", str(tmp_path / "out"), "--broker", mosquitto.url]
    r = CliRunner().invoke(main, args.split() + paths)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_method = {res["method"]: res for res in report["methods"]}
    assert sorted(by_method) == ["fedavg-full", "fedavg-lora", "flexlora"]
    full, lora = by_method["fedavg-full"], by_method["fedavg-lora"]
    # every weight travels; fedavg-lora takes the weakest device's budget rank (16 of this 32-wide tiny model),
    # so its update is already a sizeable share of the whole model here
    assert full["bytes_up_per_client_round"] > 3 * lora["bytes_up_per_client_round"]
    assert full["bytes_down"] > 0 and full["mean_personalized_accuracy"] is not None
    for name, aggregator in (("fedavg-lora", "fedavg"), ("flexlora", "flexlora"), ("fedavg-full", "fedavg-full")):
        res = by_method[name]
        assert res["updates"] > 0, res
        assert res["accuracy_curve"] and 0.0 <= res["final_global_accuracy"] <= 1.0, res["accuracy_curve"]
        db = sqlite3.connect(tmp_path / "out" / name / "server" / "state.sqlite3")
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            statuses = dict(db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
        finally:
            db.close()
        assert meta["aggregator"] == aggregator  # the server ran the method's aggregator
        assert statuses.get("aggregated", 0) > 0 and "rejected" not in statuses, statuses  # dense uploads


@pytest.mark.slow
def test_pi_class_devices_train_on_the_native_executorch_trainer(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A profile without ORT (like rpi4-4gb) runs the torch-free C++ trainer on an ExecuTorch export."""
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    pi = tmp_path / "tiny-pi.toml"
    text = tiny_profile_path.read_text().replace('name = "tiny-test"', 'name = "tiny-pi"')
    pi.write_text(
        text.replace('runtimes = ["ort"]', 'runtimes = ["executorch"]').replace(
            'default_runtime = "ort"', 'default_runtime = "executorch"'
        )
    )
    data = _dataset(tmp_path / "data.jsonl", n=200)
    args = "simulate --clients 2 --alpha 1.0 --rounds 2 --local-steps 4 --max-seq-len 16 --lr 0.01 --time-scale 0"
    args += " --minutes 3 --method fedhft --clusters 1"
    paths = ["--profiles", f"{tiny_profile_path}:1,{pi}:1", "--dataset", str(data), "--model", str(tiny_model_dir)]
    paths += ["--out", str(tmp_path / "out"), "--broker", mosquitto.url]
    r = CliRunner().invoke(main, args.split() + paths)
    assert r.exit_code == 0, r.output
    (res,) = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]
    assert res["backend_by_profile"] == {str(tiny_profile_path): "ort", str(pi): "native"}, res["backend_by_profile"]
    assert not res["edges_failed"] and res["updates"] >= 4, res
    db = sqlite3.connect(tmp_path / "out" / "fedhft" / "server" / "state.sqlite3")
    try:
        by_client = dict(
            db.execute("SELECT client_id, COUNT(*) FROM updates WHERE status = 'aggregated' GROUP BY client_id")
        )
    finally:
        db.close()
    assert by_client.get("c001", 0) >= 1, by_client  # the ExecuTorch device's updates went into the model


@pytest.mark.slow
def test_simulate_seeds_and_int8_uploads_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """--seeds 2 --encoding fp16,int8: four real runs, macro-F1 beside accuracy, mean ± std and every seed."""
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl", n=200)
    args = "simulate --clients 2 --alpha 1.0 --rounds 2 --local-steps 4 --max-seq-len 16 --lr 0.01"
    args += " --time-scale 0.001 --minutes 3 --method fedhft --clusters 1 --seeds 2 --encoding fp16,int8 --last-k 2"
    args += " --time-budget 1e6"  # a simulated clock (tiny sleeps), so that a budget reads a version
    paths = ["--profiles", f"{tiny_profile_path}:2", "--dataset", str(data), "--model", str(tiny_model_dir)]
    paths += ["--out", str(tmp_path / "out"), "--broker", mosquitto.url]
    r = CliRunner().invoke(main, args.split() + paths)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["seeds"] == [0, 1] and report["config"]["encodings"] == ["fp16", "int8"]
    runs = {(res["method"], res["seed"]): res for res in report["methods"]}
    assert sorted(runs) == [("fedhft", 0), ("fedhft", 1), ("fedhft+int8", 0), ("fedhft+int8", 1)]
    for (name, seed), res in runs.items():
        assert (tmp_path / "out" / f"seed-{seed}" / name / "result.json").is_file()
        assert res["accuracy_curve"] and all(0.0 <= p["macro_f1"] <= 1.0 for p in res["accuracy_curve"])
        assert res["final_global_macro_f1"] is not None and res["global_accuracy_at_budget"] is not None
        clients = res["personalized_by_client"]
        assert clients and all(c["n"] > 0 for c in clients.values()), clients
        assert res["mean_personalized_accuracy"] is not None and res["by_cluster"]
    for seed in (0, 1):  # int8 rows are about half the bytes of fp16 ones
        assert (
            runs[("fedhft+int8", seed)]["bytes_up_per_client_round"]
            < runs[("fedhft", seed)]["bytes_up_per_client_round"]
        )
    summary = {s["method"]: s for s in report["summary"]}
    acc = summary["fedhft"]["final_global_accuracy"]
    assert set(acc["by_seed"]) == {"0", "1"} and acc["mean"] is not None and acc["std"] is not None
    assert "final_global_accuracy by seed" in r.output


@pytest.mark.slow
def test_sigterm_stops_the_simulation_and_every_process_it_started(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path
) -> None:
    """A supervisor's SIGTERM to `fedhft simulate` (its own broker) leaves no broker, server or edge behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench.tree_rss import tree_pids

    data = _dataset(tmp_path / "data.jsonl", n=200)
    args = "simulate --clients 2 --alpha 1.0 --rounds 500 --local-steps 4 --max-seq-len 16 --minutes 10"
    paths = ["--profiles", f"{tiny_profile_path}:2", "--dataset", str(data), "--model", str(tiny_model_dir)]
    paths += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "FEDHFT_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "simulate.log"  # a file, not a pipe: processes left behind would hold a pipe open
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fedhft.cli", *args.split(), *paths], env=env, stderr=stderr)
    try:
        deadline, started = time.monotonic() + 180, []
        while time.monotonic() < deadline and proc.poll() is None:
            started = tree_pids(proc.pid)[1:]
            if len(started) >= 4:  # broker, server and both edges (and the evaluator's helpers, if any)
                break
            time.sleep(0.5)
        assert proc.poll() is None and len(started) >= 4, started
        time.sleep(2.0)  # the fleet at work
        started = tree_pids(proc.pid)[1:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "stopped by SIGTERM: the simulation's broker, server and edges were stopped"
    ), err[-2000:]
    alive = []
    for pid in started:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"left running after SIGTERM: {alive}"
