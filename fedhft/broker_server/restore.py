"""Start-up: the registry and the federation rebuilt from the state store (after its crash recovery).

Clients come back with their plans, seqs, memberships and heads; pending updates are decoded again from the
payloads they were stored as (scaled as they were when accepted). The versions up to ``max_staleness`` before
the latest come back too, where the store still has their states and memberships, so stale updates are
aggregated as changes since the models they trained from (:mod:`fedhft.broker_server.version_history`). A
stored client whose plan no longer fits the manifest is dropped, and a stored update that cannot be read is
marked rejected ("lost").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fedhft.broker_server import sim_time
from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate
from fedhft.broker_server.ingest import ClientInfo
from fedhft.broker_server.state_backend import StateBackend
from fedhft.broker_server.state_dir import StateError, StateLost
from fedhft.broker_server.state_schema import ClientRow, StoredUpdate
from fedhft.broker_server.strategies import get_strategy
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, PlanRejected, scale_update, to_client_update
from fedhft.broker_server.version_history import PastVersion
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol import decode_update

log = logging.getLogger("fedhft.server")

RESTORE_MAX_BYTES = 1 << 30  # stored payloads passed their client's size limit when they arrived


def past_versions(store: StateBackend, max_staleness: int) -> list[PastVersion]:
    """The versions before the latest, back to ``max_staleness`` older, whose states and memberships the store
    still has (a multi-cluster version without memberships cannot be rebuilt and is left out)."""
    records = store.versions()
    if not records:
        return []
    newest = records[-1].version
    out = []
    for record in records[:-1]:
        if record.version < newest - max_staleness:
            continue
        memberships = store.load_memberships(record)
        if memberships is None and record.clusters > 1:
            continue
        try:
            states = store.load_states(record)
        except StateError:  # pruned
            continue
        out.append(PastVersion(record.version, states, memberships or {}))
    return out


def client_info(row: ClientRow, spec: GlobalSpec) -> ClientInfo | None:
    """The registry's entry for a stored client; None (logged) when its plan no longer fits the manifest."""
    try:
        plan = ClientPlan.from_plan(row.plan, spec)
    except PlanRejected as exc:
        event(
            log, "dropping a stored client whose plan no longer fits", logging.WARNING, client=row.client_id, error=exc
        )
        return None
    return ClientInfo(plan, row.profile, row.manifest_sha256, row.last_seq)


def decode_pending(
    store: StateBackend, spec: GlobalSpec, rows: Sequence[StoredUpdate]
) -> tuple[list[PendingUpdate], list[int]]:
    """Stored pending updates decoded again from their payloads (scaled as when accepted), and the ids of those
    that cannot be read (for the caller to mark rejected, "lost")."""
    pending: list[PendingUpdate] = []
    lost: list[int] = []
    for stored in rows:
        try:
            payload = store.load_payload(stored)
            decoded = decode_update(payload, max_bytes=RESTORE_MAX_BYTES)
            tensors = scale_update(decoded.tensors, stored.clip_scale)
            to_client_update(stored.client_id, stored.num_samples, stored.base_version, tensors, spec)
        except StateLost:
            raise  # the server lost the state (or must step down): nothing here is lost, and it must stop
        except (StateError, FedHFTError, KeyError) as exc:
            event(log, "a stored update cannot be read", logging.ERROR, id=stored.id, error=exc)
            lost.append(stored.id)
            continue
        pending.append(
            PendingUpdate(
                stored.id,
                stored.client_id,
                stored.seq,
                stored.base_version,
                stored.num_samples,
                stored.received_at,
                tensors,
                sim_time.sent_at(decoded),
            )
        )
    return pending, lost


def restore(
    store: StateBackend, spec: GlobalSpec, config: FederationConfig
) -> tuple[Federation, dict[str, ClientInfo]]:
    """The federation at the last committed version with its pending updates, and the client registry."""
    meta = store.meta()
    latest = store.latest_version()
    needs_history = get_strategy(config.aggregator).needs_received  # fedavg-full's uploads are changes already
    states = store.load_states(latest) if latest else None
    rows = store.load_clients()
    registry: dict[str, ClientInfo] = {}
    federation = Federation(
        spec,
        config,
        version=latest.version if latest else 0,
        states=states,
        memberships={cid: r.membership for cid, r in rows.items() if r.membership},
        aggregations=int(meta.get("aggregations", "0")),
        last_cluster_round=int(meta.get("last_cluster_round", "-1")),
        virtual_time=sim_time.restored(meta),
        history=past_versions(store, config.max_staleness) if latest and needs_history else (),
    )
    for cid, row in rows.items():
        info = client_info(row, spec)
        if info is None:
            continue
        registry[cid] = info
        federation.register(cid, info.plan)
        if row.head:
            federation.set_head(cid, row.head)
    pending, lost = decode_pending(store, spec, store.load_pending())
    for p in pending:
        federation.add_pending(p)
    store.mark_rejected(lost, "lost")
    event(
        log,
        "state restored",
        version=federation.version,
        clients=len(registry),
        pending=len(federation.pending),
        clusters=federation.num_clusters,
    )
    return federation, registry
