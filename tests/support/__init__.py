"""Helpers shared by the tests and the bench scripts: Mosquitto and TLS brokers, the server as a subprocess,
a stub server for edge tests, cached ExecuTorch builds, the poisoning experiment, torch-free subprocesses.

Import them as ``tests.support.<module>`` with the repository root on ``sys.path`` (pytest's ``pythonpath``
option does it for the tests; the bench scripts insert it themselves).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the folder holding ``fedhft/``), for subprocess ``PYTHONPATH`` and file paths."""
