"""Errors of the wire protocol.

Every failure to decode, validate or sign a message raises a :class:`ProtocolError` subclass whose
message names the problem (the field, the tensor, the file, expected vs got). Decoders let no other
exception type escape, whatever bytes they are given.

Hierarchy::

    ProtocolError
    ├── MalformedMessage          bytes that are not a well-formed message
    │   ├── WrongMessageKind      a well-formed envelope of another kind (e.g. a model given to decode_update)
    │   ├── HeaderError           a header field missing, of the wrong type or out of range
    │   └── TensorError           a tensor that breaks the naming / shape / value rules
    │       ├── UnknownTensor
    │       ├── MissingTensor
    │       ├── ShapeMismatch
    │       ├── NonFiniteTensor
    │       └── BadIndices        row indices not sorted, unique, non-negative int32 or out of range
    ├── UnsupportedVersion        an envelope format version this code does not speak
    ├── MessageTooLarge           payload or decompressed body over the size limit (zip bombs end here)
    ├── BadSignature              missing, invalid or foreign signature on a model message
    ├── StaleModel                a model older than the caller's minimum version
    ├── Misaddressed              a message for someone else
    │   ├── WrongTask             ... for another task
    │   └── WrongRecipient        ... from/for another client_id or model target than the caller expects
    ├── EncodingError             a message that cannot be encoded (unknown encoding, beyond fp16 range)
    ├── TopicError                an MQTT topic or id that is not ours / not valid
    └── KeyFileError              a key file that cannot be read, parsed or written
"""

from __future__ import annotations

from fedhft.errors import FedHFTError


class ProtocolError(FedHFTError):
    """Base of every wire-protocol error."""


class MalformedMessage(ProtocolError):
    """The bytes are not a well-formed message."""


class WrongMessageKind(MalformedMessage):
    """A well-formed envelope, but of another message kind than the decoder's."""


class HeaderError(MalformedMessage):
    """A header field is missing, unknown, of the wrong type or out of range."""


class TensorError(MalformedMessage):
    """A tensor breaks the naming, shape or value rules."""


class UnknownTensor(TensorError):
    """A tensor name outside the naming convention or the expected set."""


class MissingTensor(TensorError):
    """A tensor the convention or the expected set requires is absent."""


class ShapeMismatch(TensorError):
    """A tensor of the wrong rank, shape or dtype."""


class NonFiniteTensor(TensorError):
    """A tensor holding NaN or infinity."""


class BadIndices(TensorError):
    """Row indices that are not sorted, unique, non-negative int32 values within range."""


class UnsupportedVersion(ProtocolError):
    """An envelope format version this code does not speak."""


class MessageTooLarge(ProtocolError):
    """The payload or its decompressed body exceeds the size limit."""


class BadSignature(ProtocolError):
    """A model message whose signature is missing, invalid or made by another key."""


class StaleModel(ProtocolError):
    """A model message older than the minimum version the caller accepts."""


class Misaddressed(ProtocolError):
    """A well-formed message meant for another task, client or target than the caller expects."""


class WrongTask(Misaddressed):
    """A message of another task."""


class WrongRecipient(Misaddressed):
    """A message naming another client_id or model target than the caller expects."""


class EncodingError(ProtocolError):
    """A message that cannot be encoded as asked (unknown encoding, values beyond fp16 range)."""


class TopicError(ProtocolError):
    """An MQTT topic, filter or id that is not valid in the fedhft topic tree."""


class KeyFileError(ProtocolError):
    """A key file that cannot be read, parsed or written."""
