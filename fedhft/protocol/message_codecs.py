"""Bytes <-> messages: encode and decode updates, models, hellos and acks.

An update or model body is a safetensors blob (fedhft.protocol.body) in the envelope
(fedhft.protocol.envelope); a hello or ack body is one JSON object of the message fields. Decoders check
the payload size, the envelope, every header field (fedhft.protocol.fields) and every tensor rule
(fedhft.protocol.tensor_rules); any failure raises a :class:`ProtocolError` subclass, never anything else.

Model messages are signed with Ed25519 over the envelope. ``decode_model`` with a ``verify_key`` checks
the signature before parsing anything and raises BadSignature when it is missing, invalid or made by
another key; edge runtimes always pass the key. Without a key the signature is not checked: that mode
is for outside tooling that only inspects messages.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhft.protocol.body import pack_body, parse_meta, parse_safetensors
from fedhft.protocol.encodings import canonical_tensors, check_encodings_fit, decode_tensors, encode_tensors
from fedhft.protocol.envelope import (
    DEFAULT_MAX_BYTES,
    KIND_ACK,
    KIND_HELLO,
    KIND_MODEL,
    KIND_UPDATE,
    as_bytes,
    unwrap,
    verify_signed,
    wrap,
)
from fedhft.protocol.errors import BadSignature, EncodingError, StaleModel
from fedhft.protocol.fields import (
    ACK_FIELDS,
    HELLO_FIELDS,
    MODEL_FIELDS,
    UPDATE_FIELDS,
    Validator,
    check_recipient,
    fields_of,
    json_dumps,
    json_object,
    parse_fields,
)
from fedhft.protocol.messages import AckMessage, HelloMessage, ModelMessage, UpdateMessage
from fedhft.protocol.signing import key_id
from fedhft.protocol.tensor_names import MODEL_SUFFIXES, UPDATE_SUFFIXES
from fedhft.protocol.tensor_rules import Shapes, check_model_tensors, check_update_tensors


def encode_update(msg: UpdateMessage, encoding: str = "fp16") -> bytes:
    """Validate ``msg`` and encode it; float tensors use ``encoding`` (fp32 | fp16 | int8)."""
    header = fields_of(msg, UPDATE_FIELDS, "update header")
    tensors = canonical_tensors(msg.tensors, UPDATE_SUFFIXES, has_indices=True)
    check_update_tensors(tensors)
    stored, encodings = encode_tensors(tensors, encoding)
    return wrap(KIND_UPDATE, pack_body(header, stored, encodings))


def decode_update(
    payload: bytes,
    expected_shapes: Shapes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    out_features: Mapping[str, int] | None = None,
    expected_task: str | None = None,
    expected_client_id: str | None = None,
) -> UpdateMessage:
    """Decode and validate an update; ProtocolError subclasses on any problem.

    ``expected_shapes``: tensor name -> shape (None = any size in that dimension); when given, the names
    must match exactly. ``out_features``: module -> out_features, bounds each ``<m>.rows``.
    ``expected_task`` / ``expected_client_id``: raise WrongTask / WrongRecipient on a mismatch (pass the
    ids of the topic the update came on).
    """
    data = as_bytes(payload, max_bytes)
    envelope = unwrap(data, KIND_UPDATE, max_bytes)
    metadata, stored = parse_safetensors(envelope.raw)
    raw_header, encodings = parse_meta(metadata)
    header = parse_fields(raw_header, UPDATE_FIELDS, "update header")
    check_recipient(header, {"task": expected_task, "client_id": expected_client_id}, "update")
    check_encodings_fit(encodings, has_indices=True)
    tensors = decode_tensors(stored, encodings)
    check_update_tensors(tensors, expected_shapes, out_features)
    return UpdateMessage(**header, tensors=tensors)


def encode_model(msg: ModelMessage, signing_key: Ed25519PrivateKey, encoding: str = "fp32") -> bytes:
    """Validate ``msg``, encode it and sign it with ``signing_key``; an empty key_id is filled in."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise EncodingError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
    signer = key_id(signing_key)
    if msg.key_id not in ("", signer):
        raise EncodingError(f"model key_id {msg.key_id!r} is not the signing key's id {signer!r}")
    fields = {name: getattr(msg, name) for name in MODEL_FIELDS} | {"key_id": signer}
    header = parse_fields(fields, MODEL_FIELDS, "model header")
    tensors = canonical_tensors(msg.tensors, MODEL_SUFFIXES, has_indices=False)
    check_model_tensors(tensors)
    stored, encodings = encode_tensors(tensors, encoding)
    return wrap(KIND_MODEL, pack_body(header, stored, encodings), signing_key)


def decode_model(
    payload: bytes,
    verify_key: Ed25519PublicKey | None = None,
    expected_task: str | None = None,
    min_version: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    expected_target: str | None = None,
    expected_shapes: Shapes | None = None,
) -> ModelMessage:
    """Decode and validate a model message.

    With ``verify_key`` (edge runtimes always pass it) the signature is checked first: missing, invalid
    or another key's -> BadSignature. Without it the signature is NOT checked (inspection tooling only).
    ``expected_task`` -> WrongTask, ``expected_target`` -> WrongRecipient, ``version < min_version`` ->
    StaleModel.
    """
    data = as_bytes(payload, max_bytes)
    if verify_key is not None:
        verify_signed(data, verify_key, "model")
    envelope = unwrap(data, KIND_MODEL, max_bytes)
    metadata, stored = parse_safetensors(envelope.raw)
    raw_header, encodings = parse_meta(metadata)
    header = parse_fields(raw_header, MODEL_FIELDS, "model header")
    if verify_key is not None and header["key_id"] != key_id(verify_key):
        raise BadSignature(f"model names key_id {header['key_id']!r}, the verify key is {key_id(verify_key)!r}")
    check_recipient(header, {"task": expected_task, "target": expected_target}, "model")
    if min_version is not None and header["version"] < min_version:
        raise StaleModel(f"model version {header['version']} is older than the minimum {min_version}")
    check_encodings_fit(encodings, has_indices=False)
    tensors = decode_tensors(stored, encodings)
    check_model_tensors(tensors, expected_shapes)
    return ModelMessage(**header, tensors=tensors)


def _encode_json(kind: int, msg: object, spec: Mapping[str, Validator], what: str) -> bytes:
    header = fields_of(msg, spec, what)
    return wrap(kind, json_dumps(header, what).encode("utf-8"))


def _decode_json(payload: bytes, kind: int, spec: Mapping[str, Validator], what: str, max_bytes: int) -> dict:
    data = as_bytes(payload, max_bytes)
    envelope = unwrap(data, kind, max_bytes)
    return parse_fields(json_object(envelope.raw, what), spec, what)


def encode_hello(msg: HelloMessage) -> bytes:
    """Validate and encode a hello."""
    return _encode_json(KIND_HELLO, msg, HELLO_FIELDS, "hello")


def decode_hello(
    payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, *, expected_task: str | None = None
) -> HelloMessage:
    """Decode and validate a hello; WrongTask when ``expected_task`` is given and differs."""
    header = _decode_json(payload, KIND_HELLO, HELLO_FIELDS, "hello", max_bytes)
    check_recipient(header, {"task": expected_task}, "hello")
    return HelloMessage(**header)


def encode_ack(msg: AckMessage) -> bytes:
    """Validate and encode an ack."""
    return _encode_json(KIND_ACK, msg, ACK_FIELDS, "ack")


def decode_ack(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    expected_task: str | None = None,
    expected_client_id: str | None = None,
) -> AckMessage:
    """Decode and validate an ack; WrongTask / WrongRecipient on a task / client_id mismatch."""
    header = _decode_json(payload, KIND_ACK, ACK_FIELDS, "ack", max_bytes)
    check_recipient(header, {"task": expected_task, "client_id": expected_client_id}, "ack")
    return AckMessage(**header)
