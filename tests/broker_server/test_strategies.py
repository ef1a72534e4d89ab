"""The strategy registry and interface: built-in capabilities, typed updates built once, the robust wrapper, and
a test-only strategy registered through FEDHFT_STRATEGIES reaching the coordinator, the server CLI and the
simulator without editing fedhft."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.factor_aggregation import LoraFactors
from fedhft.broker_server.federation import Federation, FederationConfig, FederationError, PendingUpdate
from fedhft.broker_server.robust import RobustError
from fedhft.broker_server.strategies import STRATEGIES, StrategyError, available, get_strategy, names_where
from fedhft.broker_server.strategies.fedavg import FedAvg
from fedhft.broker_server.strategies.registry import ENV
from fedhft.broker_server.strategies.robust_bounds import RobustBounds
from fedhft.broker_server.validation import ClientPlan
from fedhft.simulate.methods import METHODS, method_spec, methods
from tests.support.reference_baselines import fedavg_factors
from tests.support.server import plan_dict, small_spec, update_tensors
from tests.support.strategies_example import UniformFedAvg

SPEC = small_spec()
NAME = "layers.1.query"
PLUGIN = f"{UniformFedAvg.name}={UniformFedAvg.__module__}:{UniformFedAvg.__name__}"


def test_builtin_strategies_and_their_capabilities() -> None:
    assert available() == tuple(STRATEGIES) == ("fedhft", "fedavg", "hetlora", "flexlora", "fedavg-full")
    caps = {
        n: (c.training, c.accepts_masked, c.supports_robust, c.clusters, c.shared_model)
        for n, c in ((n, get_strategy(n)) for n in available())
    }
    assert caps == {
        "fedhft": ("lora", True, True, True, False),
        "fedavg": ("lora", False, False, False, False),
        "hetlora": ("lora", False, False, False, False),
        "flexlora": ("lora", False, True, False, False),
        "fedavg-full": ("full", False, False, False, True),
    }
    assert names_where(supports_robust=True) == ["fedhft", "flexlora"]
    assert all(m.aggregator in available() for m in METHODS.values())  # every simulate recipe has its strategy


def test_unknown_and_broken_registrations_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StrategyError, match="unknown strategy 'fedprox'"):
        get_strategy("fedprox")
    monkeypatch.setenv(ENV, "no-equals-sign")
    with pytest.raises(StrategyError, match="not name=module:Class"):
        available()
    monkeypatch.setenv(ENV, "fedavg=tests.support.strategies_example:UniformFedAvg")
    with pytest.raises(StrategyError, match="already registered"):
        available()
    monkeypatch.setenv(ENV, "gone=no_such_module_here:Gone")
    assert available()[-1] == "gone"
    with pytest.raises(StrategyError, match="cannot load"):
        get_strategy("gone")
    with pytest.raises(FederationError, match="cannot load"):
        FederationConfig(aggregator="gone")
    monkeypatch.setenv(ENV, f"other={UniformFedAvg.__module__}:UniformFedAvg")
    with pytest.raises(StrategyError, match="is not a Strategy named 'other'"):
        get_strategy("other")


def test_the_typed_update_is_built_once_when_the_coordinator_takes_it() -> None:
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 0.5), SPEC)
    fed = Federation(SPEC, FederationConfig())
    tensors = update_tensors(np.random.default_rng(0), SPEC, plan)
    fed.add_pending(PendingUpdate(1, "a", 1, 0, 10, 0.0, tensors))
    (p,) = fed.pending
    assert isinstance(p.update, ClientUpdate) and p.update.num_samples == 10
    assert p.update.modules[NAME].A is tensors[f"{NAME}.A"]  # the wire arrays themselves: no copy
    before = p.update
    fed.aggregate()
    assert fed.pending[0].update is before


def test_robust_bounds_wrap_only_strategies_that_support_them() -> None:
    fed = Federation(SPEC, FederationConfig(robust="median", aggregator="flexlora"))
    assert isinstance(fed.strategy, RobustBounds) and fed.strategy.name == "flexlora"
    assert not fed.strategy.accepts_masked and fed.strategy.supports_robust
    assert not isinstance(Federation(SPEC, FederationConfig()).strategy, RobustBounds)
    with pytest.raises(RobustError, match="does not support"):
        RobustBounds(FedAvg(SPEC), "median")


def test_a_plugin_strategy_runs_in_the_coordinator_and_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert UniformFedAvg.name not in available()
    monkeypatch.setenv(ENV, PLUGIN)
    assert available()[-1] == UniformFedAvg.name and get_strategy(UniformFedAvg.name) is UniformFedAvg
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), SPEC)
    fed = Federation(SPEC, FederationConfig(buffer_size=2, staleness_exponent=0, aggregator=UniformFedAvg.name))
    rng = np.random.default_rng(3)
    sent = {}
    for i, (cid, samples) in enumerate((("a", 10), ("b", 90))):
        fed.register(cid, plan)
        sent[cid] = update_tensors(rng, SPEC, plan, scale=0.5)
        fed.add_pending(PendingUpdate(i, cid, i, 0, samples, 0.0, sent[cid]))
    fed.apply(fed.aggregate())
    want = fedavg_factors([LoraFactors(A=t[f"{NAME}.A"], B=t[f"{NAME}.B_rows"]) for t in sent.values()], [1, 1])
    model = fed.client_model("a").tensors
    np.testing.assert_allclose(model[f"{NAME}.A"], want.A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[f"{NAME}.B"], want.B, rtol=1e-5, atol=1e-6)
    with pytest.raises(FederationError, match="runs without clustering"):
        FederationConfig(aggregator=UniformFedAvg.name, clusters=2)
    method = method_spec(UniformFedAvg.name)
    assert UniformFedAvg.name in methods() and method.aggregator == UniformFedAvg.name
    assert (method.planner, method.mask, method.clustering, method.shared_model) == ("legend", False, False, False)


def test_the_server_cli_accepts_a_plugin_strategy(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    code = (
        "import sys\n"
        "from fedhft.cli.server import server_run_command as run\n"
        "args = ['--broker', 'mqtt://127.0.0.1:1', '--task', 't', '--state', 's', '--manifest', sys.argv[1]]\n"
        "print(run.make_context('run', [*args, '--aggregator', sys.argv[2]]).params['aggregator'])\n"
    )
    env = {**os.environ, ENV: PLUGIN, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-c", code, str(manifest), UniformFedAvg.name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == UniformFedAvg.name, out.stderr
    env.pop(ENV)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "fedavg-uniform" in out.stderr and "is not one of" in out.stderr
