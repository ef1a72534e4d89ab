"""Numbers as the command line prints them: floats to 6 significant digits (1843.2, not 1843.1999999999998)."""

from __future__ import annotations

import json
from typing import Any


def rounded(value: Any, digits: int = 6) -> Any:
    """``value`` with every float (also inside dicts, lists and tuples) rounded to ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def dumps_rounded(value: Any) -> str:
    """Indented JSON of ``value`` with rounded floats."""
    return json.dumps(rounded(value), indent=2)
