"""Strategy names -> strategy classes, each imported only when asked for (listing names imports nothing).

The built-in strategies are :data:`STRATEGIES`. More come without editing fedhft from the environment variable
``FEDHFT_STRATEGIES``: comma-separated ``name=module:Class`` entries, the module importable (on PYTHONPATH) and
the class a :class:`~fedhft.broker_server.strategies.base.Strategy` whose ``name`` is that name. The server
CLI's ``--aggregator`` choices, ``fedhft simulate --method`` and the coordinator's config checks all read
:func:`available` and :func:`get_strategy`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from fedhft.errors import FedHFTError

if TYPE_CHECKING:
    from fedhft.broker_server.strategies.base import Strategy

ENV = "FEDHFT_STRATEGIES"
STRATEGIES: dict[str, str] = {
    "fedhft": "fedhft.broker_server.strategies.fedhft:FedHFT",
    "fedavg": "fedhft.broker_server.strategies.fedavg:FedAvg",
    "hetlora": "fedhft.broker_server.strategies.hetlora:HetLoRA",
    "flexlora": "fedhft.broker_server.strategies.flexlora:FlexLoRA",
    "fedavg-full": "fedhft.broker_server.strategies.fedavg_full:FedAvgFull",
}


class StrategyError(FedHFTError):
    """An unknown strategy name, or a registered one that cannot be loaded."""


def registered() -> dict[str, str]:
    """Every strategy name -> ``module:Class``: the built-ins, then those of ``FEDHFT_STRATEGIES``."""
    entries = dict(STRATEGIES)
    for item in os.environ.get(ENV, "").split(","):
        if not item.strip():
            continue
        name, _, target = (part.strip() for part in item.partition("="))
        module, _, attr = target.partition(":")
        if not name or not module or not attr:
            raise StrategyError(f"{ENV}: {item.strip()!r} is not name=module:Class")
        if name in entries:
            raise StrategyError(f"{ENV}: strategy {name!r} is already registered")
        entries[name] = target
    return entries


def available() -> tuple[str, ...]:
    """The strategy names, built-ins first."""
    return tuple(registered())


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name`` (imported now); StrategyError when there is none or it fails."""
    from fedhft.broker_server.strategies.base import Strategy

    entries = registered()
    if name not in entries:
        raise StrategyError(f"unknown strategy {name!r}; choose from {', '.join(entries)}")
    module, _, attr = entries[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise StrategyError(f"strategy {name!r}: cannot load {entries[name]} ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or cls.name != name:
        raise StrategyError(f"strategy {name!r}: {entries[name]} is not a Strategy named {name!r}")
    return cls


def names_where(**capabilities: object) -> list[str]:
    """The strategies whose class has every given capability value, e.g. ``names_where(supports_robust=True)``."""
    return [n for n in available() if all(getattr(get_strategy(n), k) == v for k, v in capabilities.items())]
