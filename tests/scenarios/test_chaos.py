"""A short chaos run of `fedhft simulate`: kill -9 of edges and the server, a broker restart, dropped
connections, duplicated and delayed deliveries; nothing acknowledged is lost and nothing is aggregated twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.simulate.chaos import Chaos, ChaosError, ChaosSpec, schedule
from tests.scenarios.test_simulate_e2e import _dataset

SPEC = "edge-kill=2,server-kill=1,broker-restart=1,drop=1,duplicate=2,delay=2,start=1,window=8,restart-delay=2"


def test_spec_parsing_and_seeded_schedule() -> None:
    spec = ChaosSpec.parse(SPEC)
    assert spec.counts["edge-kill"] == 2 and spec.window == 8 and spec.restart_delay == 2
    a, b = schedule(spec, seed=3), schedule(spec, seed=3)
    assert a == b and len(a) == 9 and all(1 <= f.at <= 9 for f in a)
    assert [f.at for f in a] == sorted(f.at for f in a) and schedule(spec, seed=4) != a
    assert ChaosSpec.parse("default").counts["server-kill"] == 1
    for bad in ("", "edge-kill", "meteor=1", "drop=-1", "drop=1.5", "window=0"):
        with pytest.raises(ChaosError):
            ChaosSpec.parse(bad)


def test_a_fault_without_a_target_waits_for_one() -> None:
    class Captures:  # no update captured before t=30
        now = 0.0

        def duplicate(self) -> str | None:
            return "fedhft/v1/t/update/c1" if self.now >= 30 else None

    inj = Captures()
    chaos = Chaos(
        ChaosSpec.parse("duplicate=1,start=1,window=1"),
        0,
        inj,  # type: ignore[arg-type]
        kill_edge=lambda _r: None,
        kill_server=lambda: False,
        restart_broker=lambda: False,
        drop_target=lambda _r: None,
    )
    for t in range(0, 200, 5):
        inj.now = float(t)
        chaos.tick(float(t))
    assert chaos.injected["duplicate"] == 1 and not chaos.skipped and chaos.log[0]["at"] >= 30
    never = Chaos(
        ChaosSpec.parse("edge-kill=1,start=1,window=1"),
        0,
        inj,
        lambda _r: None,
        lambda: False,  # type: ignore[arg-type]
        lambda: False,
        lambda _r: None,
    )
    for t in range(0, 400, 5):
        never.tick(float(t))
    assert never.skipped["edge-kill"] == 1 and never.pending() == 0


@pytest.mark.slow
def test_chaos_run_loses_nothing_acknowledged(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl", n=300)
    args = ["simulate", "--clients", "4", "--profiles", f"{tiny_profile_path}:4", "--dataset", str(data)]
    args += ["--alpha", "1.0", "--rounds", "30", "--local-steps", "6", "--max-seq-len", "16", "--lr", "0.01"]
    args += ["--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--time-scale", "0", "--minutes", "5"]
    args += ["--clusters", "1", "--chaos", SPEC]  # on the virtual clock: a restarted server reschedules its fleet
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    clean, faulty = report["methods"]
    assert clean["method"] == "fedhft" and faulty["method"] == "fedhft+chaos"
    c = faulty["chaos"]
    assert c["acknowledged_but_lost"] == 0, c
    assert c["duplicates_aggregated"] == 0, c
    assert sum(c["faults_injected"].values()) >= 6, c["fault_log"]
    assert {"edge-kill", "server-kill", "broker-restart"} <= set(c["faults_injected"]), c["fault_log"]
    # --rounds 30 server versions, each a flush of at least K = 2 updates (4 clients, async)
    assert c["acknowledged"] >= 2 * 30 and c["aggregated"] + c["pending_at_end"] >= c["acknowledged"] - sum(
        c["dropped_by_server"].values()
    )
    assert c["clean_final_accuracy"] is not None and c["accuracy_delta_points"] is not None
    assert faulty["final_global_accuracy"] > 0.4, faulty["accuracy_curve"]
    assert "chaos: faults" in CliRunner().invoke(main, ["report", str(tmp_path / "out")]).output
