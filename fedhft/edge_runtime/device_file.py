"""The devices file of `fedhft edge host`: `fedhft edge run` options per device, as JSON or TOML.

Options by name (``client-id`` or ``client_id``; a flag is ``true``), optionally with ``defaults`` shared by
all: JSON ``[{...}, ...]`` or ``{"defaults": {...}, "devices": [{...}, ...]}``; TOML ``[defaults]`` and
``[[devices]]``. The CLI parses each device's table as `fedhft edge run`'s command line (:func:`option_args`),
so a hosted device takes exactly the options, defaults and checks of a standalone one.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path

from fedhft.edge_runtime.client_config import ClientError


def device_entries(path: Path) -> list[dict[str, object]]:
    """The devices of a devices file, each its option table with the file's defaults under it."""
    text = Path(path).read_text()
    try:
        raw = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ClientError(f"{path}: not a readable devices file: {e}") from e
    if isinstance(raw, list):
        raw = {"devices": raw}
    devices, defaults = raw.get("devices"), raw.get("defaults", {})
    if not isinstance(devices, list) or not devices or not isinstance(defaults, dict):
        raise ClientError(f"{path}: expected a non-empty list of devices (and optional defaults)")
    if not all(isinstance(d, dict) for d in devices):
        raise ClientError(f"{path}: every device is a table of `fedhft edge run` options")
    return [{**defaults, **d} for d in devices]


def option_args(options: Mapping[str, object]) -> list[str]:
    """Command-line arguments of an option table: ``{"client_id": "c1", "virtual-time": True}`` ->
    ``["--client-id", "c1", "--virtual-time"]`` (a false or None value is left out)."""
    args: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args
