"""The server's last few versions, kept to rebuild the model a stale update trained from (FedBuff's base).

An update trained from version m is aggregated as its change since the model its client received at m
(:mod:`fedhft.broker_server.changes`); that model is rebuilt, deterministically, from version m's cluster states
and the client's membership then, by the same code that published it (:class:`~fedhft.broker_server.models.
VersionModels`). The history holds the newest ``depth`` versions (max_staleness + 1 covers every update the
coordinator accepts); a superseded version keeps its states, memberships and SVDs but drops its mixtures. After a
restart it is rebuilt from the versions the state store still has (it keeps at least that many); an update
whose version is in neither is dropped as ``stale``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.models import VersionModels
from fedhft.broker_server.strategies.base import Received


@dataclass(frozen=True)
class PastVersion:
    """One earlier version as the state store keeps it: cluster states and the clients' memberships then."""

    version: int
    states: Sequence[ClusterState]
    memberships: Mapping[str, Sequence[float]] = field(default_factory=dict)


def mean_membership(memberships: Mapping[str, np.ndarray], registered: Collection[str], k: int) -> np.ndarray:
    """The mean membership of registered clients that have one of length ``k`` (uniform when none has): the
    membership of a client without its own."""
    known = [p for cid, p in memberships.items() if cid in registered and np.shape(p) == (k,)]
    if not known:
        return np.full(k, 1.0 / k)
    mean = np.mean(known, axis=0)
    return mean / mean.sum()


class VersionHistory:
    """The models of the newest ``depth`` versions and the memberships they were published with."""

    def __init__(self, depth: int) -> None:
        self.depth = max(1, int(depth))
        self._models: dict[int, VersionModels] = {}
        self._memberships: dict[int, dict[str, np.ndarray]] = {}

    def add(self, models: VersionModels, memberships: Mapping[str, Sequence[float] | np.ndarray]) -> None:
        """Keep ``models`` (a newly applied or restored version); forget the mixtures of the others and any
        version ``depth`` or more older than the newest."""
        for old in self._models.values():
            old.forget()
        self._models[models.version] = models
        self._memberships[models.version] = {cid: np.asarray(p, dtype=np.float64) for cid, p in memberships.items()}
        newest = max(self._models)
        for v in [v for v in self._models if v <= newest - self.depth]:
            del self._models[v], self._memberships[v]

    def versions(self) -> list[int]:
        return sorted(self._models)

    def received(self, version: int, client_id: str, registered: Collection[str]) -> Received | None:
        """The model ``client_id`` got at ``version`` (its membership then, or the mean one of the clients in
        ``registered``); None when that version is no longer kept."""
        models = self._models.get(version)
        if models is None:
            return None
        k = len(models.states)
        memberships = self._memberships[version]
        p = memberships.get(client_id)
        if p is None or p.shape != (k,):
            p = mean_membership(memberships, registered, k)
        return Received(version, lambda ranks: models.tensors(p, ranks))
