"""Message header fields: strict JSON (no NaN, no duplicate keys) and the validator of every field.

Each message kind has a spec, field name -> validator; :func:`parse_fields` accepts exactly the spec's
fields, each valid, and returns their canonical values (HeaderError otherwise).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from fedhft.protocol.errors import HeaderError, MalformedMessage, WrongRecipient, WrongTask
from fedhft.protocol.messages import ACK_STATUSES
from fedhft.protocol.topics import id_problem, validate_target

MAX_TEXT = 4096
MAX_ENTRIES = 1024
I64_LIMIT = 2**63


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def json_loads(data: bytes | str, what: str) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_pairs
        )
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"{what} is not valid JSON ({str(exc)[:200]})") from exc


def json_dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"{what} is not JSON-able ({str(exc)[:200]})") from exc


def json_object(data: bytes | str, what: str) -> dict[str, Any]:
    obj = json_loads(data, what)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


Validator = Callable[[object, str], Any]
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def ident(value: object, field: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise HeaderError(f"{field} {problem}")
    assert isinstance(value, str)
    return value


def int_at_least(minimum: int) -> Validator:
    def check(value: object, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HeaderError(f"{field} must be an int, got {type(value).__name__}")
        if not minimum <= value < I64_LIMIT:
            raise HeaderError(f"{field} must be in [{minimum}, 2**63), got {value}")
        return int(value)

    return check


def _finite(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeaderError(f"{field} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as exc:
        raise HeaderError(f"{field} is too large for a float") from exc
    if not math.isfinite(number):
        raise HeaderError(f"{field} must be finite, got {number}")
    return number


def timestamp(value: object, field: str) -> float:
    number = _finite(value, field)
    if number < 0:
        raise HeaderError(f"{field} must be a unix time >= 0, got {number}")
    return number


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise HeaderError(f"{field} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value


def matching(pattern: re.Pattern[str], description: str) -> Validator:
    def check(value: object, field: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            shown = value[:80] if isinstance(value, str) else type(value).__name__
            raise HeaderError(f"{field} must be {description}, got {shown!r}")
        return value

    return check


def _entries(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HeaderError(f"{field} must be an object, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise HeaderError(f"{field} must have at most {MAX_ENTRIES} entries, got {len(value)}")
    for key in value:
        if not isinstance(key, str) or not 0 < len(key) <= 128:
            raise HeaderError(f"{field} keys must be strings of 1-128 characters, got {str(key)[:80]!r}")
    return value


def _metrics(value: object, field: str) -> dict[str, float]:
    return {k: _finite(v, f"{field}[{k!r}]") for k, v in _entries(value, field).items()}


def _meta_value(value: object, field: str) -> float | int | str:
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, int) and not isinstance(value, bool):
        if not -I64_LIMIT <= value < I64_LIMIT:
            raise HeaderError(f"{field} must fit in 64 bits, got {value}")
        return value
    if isinstance(value, float):
        return _finite(value, field)
    raise HeaderError(f"{field} must be a float, int or str, got {type(value).__name__}")


def _meta(value: object, field: str) -> dict[str, float | int | str]:
    return {k: _meta_value(v, f"{field}[{k!r}]") for k, v in _entries(value, field).items()}


def _plan(value: object, field: str) -> dict[str, Any]:
    plan = _entries(value, field)
    json_dumps(plan, field)
    return plan


def _status(value: object, field: str) -> str:
    if value not in ACK_STATUSES:
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise HeaderError(f"{field} must be one of {ACK_STATUSES}, got {shown!r}")
    assert isinstance(value, str)
    return value


def _target(value: object, field: str) -> str:
    return validate_target(value, HeaderError)


_sha256 = matching(_SHA256_RE, "64 lowercase hex characters")
_key_id = matching(_KEY_ID_RE, "16 lowercase hex characters")

UPDATE_FIELDS: dict[str, Validator] = {
    "task": ident,
    "client_id": ident,
    "seq": int_at_least(0),
    "base_version": int_at_least(0),
    "num_samples": int_at_least(1),
    "loss": _finite,
    "metrics": _metrics,
    "profile": ident,
    "manifest_sha256": _sha256,
    "created_at": timestamp,
}
MODEL_FIELDS: dict[str, Validator] = {
    "task": ident,
    "version": int_at_least(0),
    "target": _target,
    "created_at": timestamp,
    "key_id": _key_id,
    "meta": _meta,
}
HELLO_FIELDS: dict[str, Validator] = {
    "task": ident,
    "client_id": ident,
    "profile": ident,
    "manifest_sha256": _sha256,
    "plan": _plan,
    "created_at": timestamp,
}
ACK_FIELDS: dict[str, Validator] = {
    "task": ident,
    "client_id": ident,
    "seq": int_at_least(0),
    "status": _status,
    "reason": _text,
    "version": int_at_least(0),
}


def parse_fields(obj: Mapping[str, Any], spec: Mapping[str, Validator], what: str) -> dict[str, Any]:
    """Validate ``obj`` against ``spec``: exactly its fields, each valid; return canonical values."""
    unknown = sorted(str(k)[:80] for k in obj if k not in spec)
    if unknown:
        raise HeaderError(f"{what} has unknown fields {unknown[:5]}")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise HeaderError(f"{what} lacks fields {missing}")
    return {name: check(obj[name], name) for name, check in spec.items()}


def fields_of(msg: object, spec: Mapping[str, Validator], what: str) -> dict[str, Any]:
    return parse_fields({name: getattr(msg, name) for name in spec}, spec, what)


def check_recipient(header: Mapping[str, Any], expected: Mapping[str, str | None], what: str) -> None:
    """WrongTask / WrongRecipient when a header field differs from the expected (non-None) value."""
    for field, want in expected.items():
        if want is None or header[field] == want:
            continue
        error = WrongTask if field == "task" else WrongRecipient
        raise error(f"{what} {field} is {header[field]!r}, expected {want!r}")
