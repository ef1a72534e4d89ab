"""The device and server sides (and every CLI module) import with torch, transformers, optimum and executorch
blocked."""

from __future__ import annotations

from tests.support.torchfree import run_torchfree


def test_edge_server_protocol_import_without_torch() -> None:
    res = run_torchfree(
        "import json, sys, pkgutil, importlib\n"
        "import fedhft.edge_runtime, fedhft.broker_server, fedhft.protocol, fedhft.device_profiles, fedhft.cli\n"
        "mods = []\n"
        "for pkg in (fedhft.edge_runtime, fedhft.broker_server, fedhft.protocol, fedhft.device_profiles, fedhft.cli):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        name = m.name.rsplit('.', 1)[-1]\n"
        "        if name.startswith('executorch'):\n"
        "            continue\n"
        "        importlib.import_module(m.name); mods.append(name)\n"
        "from fedhft.edge_runtime.ort_backend import import_training_api\n"
        "api = import_training_api()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'mods': mods, 'api': hasattr(api, 'Module')}))\n"
    )
    assert res["torch"] is False
    assert res["api"] is True
    assert "ort_backend" in res["mods"]


def test_blocker_really_blocks() -> None:
    res = run_torchfree(
        "import json\n"
        "try:\n    import torch  # noqa\n    ok = False\nexcept ImportError:\n    ok = True\n"
        "print(json.dumps({'blocked': ok}))\n"
    )
    assert res["blocked"] is True
