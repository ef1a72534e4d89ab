"""Aggregation strategies: one module per method, a registry of names, and poisoning bounds that wrap them.

A strategy (:class:`~fedhft.broker_server.strategies.base.Strategy`) is pure: class-level capabilities, the
check and typed form of one update, one flush over the cluster states, and a state's model tensors.

Adding one is one new module plus one line: a ``Strategy`` subclass (``fedavg.py`` and ``hetlora.py`` are short
examples) and its ``name: "module:Class"`` entry in :data:`~fedhft.broker_server.strategies.registry.STRATEGIES`;
or, without editing fedhft, ``FEDHFT_STRATEGIES="name=module:Class"`` in the environment of the server (and of
``fedhft simulate``, whose servers inherit it). The CLI, the simulator and the coordinator then accept ``name``.
"""

from fedhft.broker_server.strategies.registry import STRATEGIES, StrategyError, available, get_strategy, names_where

__all__ = ["STRATEGIES", "StrategyError", "available", "get_strategy", "names_where"]
