"""Which server key this device trusts: the provisioned one (``--server-key``), or a newer one it adopted
from a verified key chain (fedhft.protocol.keychain), kept in ``<state-dir>/server_key.json``.

The file records the provisioned key it was derived from (``anchor``): a run with another ``--server-key``
(the operator re-provisioned the device) starts again from that key. Written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedhft.atomic import write_atomic
from fedhft.logs import event
from fedhft.protocol import KeyLink, ProtocolError, decode_key_chain, follow_chain, key_id, public_key_to_hex
from fedhft.protocol.signing import public_key_from_hex

log = logging.getLogger(__name__)
TRUST_FILE = "server_key.json"


class ServerTrust:
    """The trusted server key of one state directory; :meth:`consider` a key message to follow a rotation."""

    def __init__(self, state_dir: Path, provisioned: Ed25519PublicKey) -> None:
        self.path = Path(state_dir) / TRUST_FILE
        self.anchor = public_key_to_hex(provisioned)
        self.key = provisioned
        self.index: int | None = None  # the trusted key's place in the server's chain, once known
        saved = self._load()
        if saved is not None and saved.get("anchor") == self.anchor:
            try:
                self.key = public_key_from_hex(str(saved.get("key", "")), str(self.path))
            except ProtocolError as e:
                event(log, "ignoring an unreadable trusted key", logging.WARNING, path=self.path, error=str(e))
                return
            self.index = saved["index"] if isinstance(saved.get("index"), int) else None

    def _load(self) -> dict | None:
        try:
            obj = json.loads(self.path.read_text()) if self.path.exists() else None
        except (OSError, ValueError) as e:
            event(log, "ignoring an unreadable trusted-key file", logging.WARNING, path=self.path, error=str(e))
            return None
        return obj if isinstance(obj, dict) else None

    def consider(self, payload: bytes, task: str) -> KeyLink | None:
        """Verify a key message; return its newest link when that key is newly adopted (and persisted), None
        when it is the key already trusted. ProtocolError (nothing changes) when the chain is refused."""
        chain = decode_key_chain(payload, expected_task=task)
        newest = follow_chain(chain, self.key)
        if newest.public_key == public_key_to_hex(self.key):
            self.index = newest.index
            return None
        record = {
            "anchor": self.anchor,
            "key": newest.public_key,
            "key_id": newest.key_id,
            "index": newest.index,
            "previous_key_id": key_id(self.key),
            "adopted_at": time.time(),
        }
        write_atomic(self.path, (json.dumps(record, indent=1) + "\n").encode(), 0o644)
        self.key, self.index = newest.key, newest.index
        return newest
