"""`fedhft server run --role`: many ingest processes and one aggregator sharing a PostgreSQL state.

- ``all`` (the default): one process ingests, aggregates and publishes (service.py).
- ``ingest`` (any number, on any machines): takes hellos and updates through the shared subscription, validates
  them (ingest.py) and stores them, acknowledging an update only after its transaction committed. It aggregates
  nothing and publishes no model, and needs no signing key: the registry entries and the version it validates
  against are the database's, read before each batch (:class:`IngestView`).
- ``aggregator`` (one: it holds the database's lock, and ``--standby`` ones wait for it, as a single server's
  standby does): subscribes to nothing. It takes the committed updates it has not seen from the database (a poll
  at most POLL_SECONDS apart) and the registrations the ingest processes announce by NOTIFY
  (:class:`AggregatorFeed`), then flushes as a single server does (coordinator.py): aggregate, commit the version
  with its updates marked aggregated in the same transaction (which refuses an update no longer pending), apply,
  publish. A standby restores from what committed, so no acknowledged update is lost or aggregated twice.

Roles other than ``all`` need a PostgreSQL state: a SQLite state directory is one process's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate
from fedhft.broker_server.ingest import ClientInfo
from fedhft.broker_server.metrics import Metrics, refresh_gauges
from fedhft.broker_server.publisher import Publisher
from fedhft.broker_server.restore import client_info, decode_pending
from fedhft.broker_server.state_dir import is_postgres
from fedhft.broker_server.state_schema import ClientRow
from fedhft.broker_server.validation import GlobalSpec

if TYPE_CHECKING:  # psycopg is loaded only with a PostgreSQL state
    from fedhft.broker_server.state_pg import PgStateStore

ROLES = ("all", "ingest", "aggregator")


def role_problem(role: str, state: str | os.PathLike[str], *, standby: bool, virtual_time: bool) -> str | None:
    """Why ``role`` cannot run with these options (None when it can)."""
    if role not in ROLES:
        return f"--role must be one of {', '.join(ROLES)}, got {role!r}"
    if role == "all":
        return None
    if not is_postgres(state):
        return f"--role {role} needs --state postgresql://...: a SQLite state directory is single-process"
    if role == "ingest" and standby:
        return "--standby is for --role aggregator: run more ingest processes instead"
    if virtual_time:
        return "--virtual-time orders every message in one process: use --role all"
    return None


def leave_to_aggregator(_pending: PendingUpdate) -> None:
    """An ingest process keeps nothing of a stored update: the aggregator takes it from the database."""


class IngestView:
    """What an ingest process validates against, kept as the database has it: the version the aggregator last
    committed and the registry entries of the clients whose messages it handles."""

    def __init__(self, store: PgStateStore, spec: GlobalSpec, config: FederationConfig) -> None:
        """``store``: opened shared (``role="ingest"``). Loads every registered client once."""
        self.store, self.spec = store, spec
        self.federation = Federation(spec, config, version=store.latest_version_number())
        self.registry: dict[str, ClientInfo] = {}
        self._seen: dict[str, tuple[str, str, dict[str, Any]]] = {}  # the row each entry was built from
        self._take(store.load_clients().values())

    def sync(self, client_ids: Sequence[str]) -> None:
        """Read the version and these clients' registrations (plans, last seqs) from the database."""
        self.federation.follow(self.store.latest_version_number())
        self._take(self.store.registrations(client_ids).values())

    def _take(self, rows: Iterable[ClientRow]) -> None:
        for row in rows:
            cid, seen = row.client_id, (row.profile, row.manifest_sha256, row.plan)
            known = self.registry.get(cid)
            if known is not None and self._seen.get(cid) == seen:
                known.last_seq = max(known.last_seq, row.last_seq)  # in place: decoded updates stay valid
                continue
            info = client_info(row, self.spec)
            if info is None:
                self.registry.pop(cid, None)
                continue
            self.registry[cid], self._seen[cid] = info, seen
            self.federation.register(cid, info.plan)


class AggregatorFeed:
    """The aggregator's inputs from the database: registrations (notified) and committed pending updates."""

    def __init__(
        self,
        store: PgStateStore,
        spec: GlobalSpec,
        federation: Federation,
        registry: dict[str, ClientInfo],
        publisher: Publisher,
        metrics: Metrics,
    ) -> None:
        """``store``: the aggregator's, already listening (``listen_clients``) since before the
        federation was restored from it."""
        self.store, self.spec, self.federation, self.registry = store, spec, federation, registry
        self.publisher, self.metrics = publisher, metrics
        self._changed: set[str] = set()

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a registration; remember the clients that changed."""
        self._changed |= self.store.changed_clients(timeout)

    def sync(self) -> int:
        """Take the changed registrations, then the committed updates not yet pending here; how many were new."""
        known = {p.id for p in self.federation.pending}
        new = [row for row in self.store.load_pending() if row.id not in known]
        changed, self._changed = self._changed, set()
        self._register(changed | {row.client_id for row in new if row.client_id not in self.registry})
        pending, lost = decode_pending(self.store, self.spec, new)
        for p in pending:
            self.federation.add_pending(p)
        self.store.mark_rejected(lost, "lost")
        if new:
            refresh_gauges(self.metrics, self.federation)
        return len(new)

    def _register(self, client_ids: set[str]) -> None:
        """Register new or changed clients and publish each its model, as a single server does on a hello."""
        if not client_ids:
            return
        for cid, row in sorted(self.store.load_clients(sorted(client_ids)).items()):
            known = self.registry.get(cid)
            info = client_info(row, self.spec)
            if info is None:
                continue
            if known is not None and (known.plan, known.manifest_sha256, known.profile) == (
                info.plan,
                info.manifest_sha256,
                info.profile,
            ):
                continue
            self.registry[cid] = info
            self.federation.register(cid, info.plan)
            if row.head:
                self.federation.set_head(cid, row.head)
            self.publisher.publish([self.federation.client_model(cid)])
        refresh_gauges(self.metrics, self.federation)
