"""Run a snippet in a fresh interpreter where torch, transformers, optimum and executorch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT


def run_torchfree(code: str, timeout: float = 600) -> dict:
    """Run `code` in a fresh interpreter where torch/transformers/optimum/executorch cannot be imported.

    The code must print one JSON object as its last stdout line.
    """
    prelude = "from fedhft.edge_runtime.torchfree import block_heavy_imports\nblock_heavy_imports()\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
