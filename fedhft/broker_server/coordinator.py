"""When and how the federation flushes on the wall clock, then aggregate -> durable commit -> apply -> publish.

The math is the federation's (federation.py), the rules are flush_rules.py's: async (FedBuff: K updates or
W seconds) or sync (every registered client delivered an update from the current version, or the round
deadline passed). This module persists a flush's result as one version (an update is never aggregated twice)
and only then applies and publishes it. A flush that cannot be committed (storage) is retried after
STORAGE_RETRY_SECONDS, with the federation unchanged. On a simulated fleet's clock (``--virtual-time``) the
virtual clock decides when, and calls :meth:`Coordinator.aggregate_and_publish` with the event's time.
"""

from __future__ import annotations

import logging
import time

from fedhft.broker_server import sim_time
from fedhft.broker_server.federation import Federation
from fedhft.broker_server.flush_rules import FlushRule
from fedhft.broker_server.metrics import Metrics, refresh_gauges
from fedhft.broker_server.publisher import Publisher
from fedhft.broker_server.state_backend import StateBackend
from fedhft.broker_server.state_dir import StateError
from fedhft.logs import event

log = logging.getLogger("fedhft.server")

STORAGE_RETRY_SECONDS = 5.0
POLL_SECONDS = 0.25  # the longest the main loop waits for messages before it looks at the clock again


class Coordinator:
    """Flushes the federation when its flush rule says so, and persists each new version."""

    def __init__(
        self,
        federation: Federation,
        store: StateBackend,
        metrics: Metrics,
        publisher: Publisher,
        *,
        aggregator: str,
        keep_versions: int,
        rule: FlushRule | None = None,
    ) -> None:
        self.federation = federation
        self.store = store
        self.metrics = metrics
        self.publisher = publisher
        self.aggregator = aggregator
        self.keep_versions = keep_versions
        cfg = federation.config
        self.rule = rule or FlushRule("async", cfg.buffer_size, cfg.window_seconds)
        self._retry_at = 0.0
        self.round_start = time.time()  # sync: when the current version was published

    def wait_seconds(self, now: float) -> float:
        """How long the main loop may wait for messages before the next flush is due."""
        fed = self.federation
        if not fed.pending:
            wait = None
        elif self.rule.sync:
            closes = self.rule.round_closes_at(self.round_start)
            wait = None if closes is None else closes - now
        else:
            oldest = fed.oldest_pending_at()
            wait = 0.0 if len(fed.pending) >= self.rule.buffer_size else self.rule.window_closes_at(oldest) - now
        timeout = POLL_SECONDS if wait is None else min(POLL_SECONDS, max(wait, 0.0))
        if now < self._retry_at:
            timeout = POLL_SECONDS
        return timeout

    def due(self, now: float) -> bool:
        """The flush rule on the wall clock: FedBuff's K/W, or a sync round complete or past its deadline."""
        fed = self.federation
        if self.rule.sync:
            delivered = {p.client_id for p in fed.pending if p.base_version == fed.version}
            return self.rule.round_due(fed.clients, delivered, len(fed.pending), self.round_start, now)
        return self.rule.buffer_due(len(fed.pending), fed.oldest_pending_at(), now)

    def flush_if_due(self, now: float) -> None:
        """Aggregate when updates are pending, the flush rule says so and no storage retry is waiting."""
        if self.federation.pending and now >= self._retry_at and self.due(now):
            self.aggregate_and_publish()

    def aggregate_and_publish(self, virtual_time: float | None = None) -> bool:
        """One flush: aggregate, commit durably, then publish; False when it could not commit. ``virtual_time``
        (a simulated fleet's clock) stamps the new version with the time of the event that flushed it."""
        t0 = time.perf_counter()
        result = self.federation.aggregate()
        if virtual_time is not None:
            result.virtual_time = max(result.virtual_time, virtual_time)
        try:
            if not result.aggregated_ids:
                for reason in sorted(set(result.dropped.values())):
                    self.store.mark_rejected([i for i, r in result.dropped.items() if r == reason], reason)
            else:
                self.store.commit_version(
                    result.version,
                    result.states,
                    result.aggregated_ids,
                    {cid: list(map(float, p)) for cid, p in result.memberships.items()},
                    {
                        "aggregations": str(result.aggregations),
                        "last_cluster_round": str(result.last_cluster_round),
                        **sim_time.to_meta(result.virtual_time),
                        "aggregator": self.aggregator,
                    },
                    dropped=result.dropped,
                    keep_versions=self.keep_versions,
                )
        except StateError as exc:
            self._retry_at = time.time() + STORAGE_RETRY_SECONDS
            event(log, "could not commit an aggregation; will retry", logging.ERROR, error=exc)
            return False
        self.federation.apply(result)
        for reason in result.dropped.values():
            self.metrics.inc("fedhft_updates_total", {"status": "dropped", "reason": reason})
        if not result.aggregated_ids:
            refresh_gauges(self.metrics, self.federation)
            return True
        self.round_start = time.time()
        self.metrics.observe("fedhft_aggregation_seconds", time.perf_counter() - t0)
        if result.clipped:
            self.metrics.inc("fedhft_updates_clipped_total", {"bound": "clip_multiple"}, result.clipped)
        event(
            log,
            "aggregated",
            version=result.version,
            updates=len(result.aggregated_ids),
            dropped=len(result.dropped),
            clipped=result.clipped,
            clusters=len(result.states),
            reclustered=result.reclustered,
            seconds=round(time.perf_counter() - t0, 4),
        )
        self.publisher.publish_models()
        return True
