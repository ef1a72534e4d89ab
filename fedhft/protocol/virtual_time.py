"""Virtual time of a simulated fleet: the two messages that order events by the devices' clocks.

Only `fedhft simulate` uses them. A device that starts a round at virtual time S knows when its update will
land (S + download + steps x step time + upload), so before training it *promises* that time. The server
processes updates in promised order (ties by client id), never past a time some active device could still
deliver earlier, and answers each device with a *schedule*: the virtual time to start its next round at and
the model version to train from. Host load then changes how long a run takes, never what it computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, KIND_PROMISE, KIND_SCHEDULE, as_bytes, unwrap, wrap
from fedhft.protocol.errors import HeaderError
from fedhft.protocol.fields import (
    Validator,
    check_recipient,
    fields_of,
    ident,
    int_at_least,
    json_dumps,
    json_object,
    parse_fields,
    timestamp,
)


def _virtual_seconds(value: object, field: str) -> float:
    number = timestamp(value, field)  # finite and >= 0, like a unix time
    if number > 1e12:
        raise HeaderError(f"{field} must be at most 1e12 virtual seconds, got {number}")
    return number


@dataclass(frozen=True)
class PromiseMessage:
    """Client -> server: update ``seq``, trained from ``base_version``, lands at virtual time ``due``."""

    task: str
    client_id: str
    seq: int
    base_version: int
    due: float
    created_at: float


@dataclass(frozen=True)
class ScheduleMessage:
    """Server -> client: start the next round at virtual time ``start_at`` from model ``version``."""

    task: str
    client_id: str
    start_at: float
    version: int
    created_at: float


PROMISE_FIELDS: dict[str, Validator] = {
    "task": ident,
    "client_id": ident,
    "seq": int_at_least(0),
    "base_version": int_at_least(0),
    "due": _virtual_seconds,
    "created_at": timestamp,
}
SCHEDULE_FIELDS: dict[str, Validator] = {
    "task": ident,
    "client_id": ident,
    "start_at": _virtual_seconds,
    "version": int_at_least(0),
    "created_at": timestamp,
}


def _encode(kind: int, msg: object, spec: Mapping[str, Validator], what: str) -> bytes:
    return wrap(kind, json_dumps(fields_of(msg, spec, what), what).encode("utf-8"))


def _decode(payload: bytes, kind: int, spec: Mapping[str, Validator], what: str, max_bytes: int) -> dict:
    envelope = unwrap(as_bytes(payload, max_bytes), kind, max_bytes)
    return parse_fields(json_object(envelope.raw, what), spec, what)


def encode_promise(msg: PromiseMessage) -> bytes:
    """Validate and encode a promise."""
    return _encode(KIND_PROMISE, msg, PROMISE_FIELDS, "promise")


def decode_promise(
    payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, *, expected_task: str | None = None
) -> PromiseMessage:
    """Decode and validate a promise; WrongTask when ``expected_task`` is given and differs."""
    header = _decode(payload, KIND_PROMISE, PROMISE_FIELDS, "promise", max_bytes)
    check_recipient(header, {"task": expected_task}, "promise")
    return PromiseMessage(**header)


def encode_schedule(msg: ScheduleMessage) -> bytes:
    """Validate and encode a schedule."""
    return _encode(KIND_SCHEDULE, msg, SCHEDULE_FIELDS, "schedule")


def decode_schedule(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    expected_task: str | None = None,
    expected_client_id: str | None = None,
) -> ScheduleMessage:
    """Decode and validate a schedule; WrongTask / WrongRecipient on a task / client_id mismatch."""
    header = _decode(payload, KIND_SCHEDULE, SCHEDULE_FIELDS, "schedule", max_bytes)
    check_recipient(header, {"task": expected_task, "client_id": expected_client_id}, "schedule")
    return ScheduleMessage(**header)
