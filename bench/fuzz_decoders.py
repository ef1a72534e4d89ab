"""Fuzzing figures: seeded random and mutated messages through every decoder; crashes must be 0.

A *crash* is any exception other than a ProtocolError subclass (the decoders' contract: a message or a
ProtocolError, whatever the bytes). Seeds are valid messages of each kind (updates and models in fp32, fp16
and int8, hello, ack, a 3-key chain). Mutations, each drawn with the same probability:

* ``random``     random bytes (0-4 KB), half of them behind a valid magic and version;
* ``bitflip``    1-16 flipped bits anywhere in a valid message;
* ``bytes``      1-8 bytes set to 0x00, 0xff, 0x7f, 0x80 or a random value;
* ``truncate``   the message cut at a random length;
* ``extend``     random bytes appended;
* ``envelope``   one envelope field (version, kind, flags, reserved, lengths) set to an edge or random value;
* ``body``       the inflated body mutated (bit flips, JSON / safetensors-header characters, cuts, splices),
  then deflated and wrapped in a correct envelope, and re-signed for the signed kinds, so the mutation
  reaches the JSON, safetensors and field validation behind the signature check;
* ``fields``     like ``body``, but the JSON is parsed and one value changed to an edge value of another type
  (or a key dropped / added): message fields, link fields, tensor dtypes, shapes, offsets, encodings, so
  well-formed bodies with wrong contents reach the header and tensor rules;
* ``tensors``    (updates and models; ``fields`` for the JSON kinds) a valid safetensors body whose tensors
  break the rules: one dropped, renamed, reshaped, retyped, added, NaN/inf values, row indices unsorted,
  repeated, negative or out of range.

Models are decoded without a key (inspection mode: full parsing) and with the right key (the edge's mode);
key chains with their newest key. Run: `.venv/bin/python bench/fuzz_decoders.py [--n 20000] [--seed 0]`
(about a minute); writes bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhft.protocol import (
    AckMessage,
    HelloMessage,
    KeyChainMessage,
    ModelMessage,
    ProtocolError,
    UpdateMessage,
    decode_ack,
    decode_hello,
    decode_key_chain,
    decode_model,
    decode_update,
    encode_ack,
    encode_hello,
    encode_key_chain,
    encode_model,
    encode_update,
)
from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, ENVELOPE, ENVELOPE_LEN, FLAG_SIGNED, FLAG_ZLIB, MAGIC, unwrap
from fedhft.protocol.keychain import extend_chain, genesis_link
from fedhft.protocol.signing import SIGNATURE_LEN, sign

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
MUTATIONS = ("random", "bitflip", "bytes", "truncate", "extend", "envelope", "body", "fields", "tensors")
SHA = "3c" * 32
JSONISH = b'{}[]":,0123456789-.eE+ tfnul\\'


def _key(i: int) -> Ed25519PrivateKey:
    """A fixed Ed25519 key (the run is reproducible byte for byte)."""
    return Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)


def _seeds() -> tuple[dict[str, list[bytes]], object, object]:
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731
    upd = {
        "layers.0.query.A": f32(2, 8),
        "layers.0.query.B_rows": f32(3, 2),
        "layers.0.query.rows": np.array([0, 3, 7], np.int32),
        "layers.1.value.A": f32(4, 8),
        "layers.1.value.B_rows": f32(2, 4),
        "layers.1.value.rows": np.array([1, 5], np.int32),
        "head.weight": f32(3, 8),
        "head.bias": f32(3),
    }
    mdl = {
        "layers.0.query.A": f32(4, 8),
        "layers.0.query.B": f32(8, 4),
        "layers.1.value.A": f32(4, 8),
        "layers.1.value.B": f32(8, 4),
        "head.weight": f32(3, 8),
        "head.bias": f32(3),
    }
    private = _key(0)
    public = private.public_key()
    update = UpdateMessage("task", "dev-1", 3, 2, 16, 0.7, {"acc": 0.5}, "rpi4", SHA, 1.7e9, upd)
    model = ModelMessage("task", 5, "cluster/0", 1.7e9, "", {"round": 5, "cluster": 0}, mdl)
    hello = HelloMessage("task", "dev-1", "rpi4", SHA, {"layers": [{"layer": 0, "rank": 2}], "mask_ratio": 0.5}, 1.7e9)
    ack = AckMessage("task", "dev-1", 3, "accepted", "", 5)
    keys = [_key(i) for i in (1, 2, 3)]
    links = (genesis_link(keys[0], 1.0),)
    for i in (1, 2):
        links = extend_chain(links, keys[i - 1], keys[i].public_key(), 1.0 + i)
    seeds = {
        "update": [encode_update(update, e) for e in ("fp32", "fp16", "int8")],
        "model": [encode_model(model, private, e) for e in ("fp32", "fp16", "int8")],
        "hello": [encode_hello(hello)],
        "ack": [encode_ack(ack)],
        "key": [encode_key_chain(KeyChainMessage("task", 1.7e9, links), keys[2])],
    }
    return seeds, (private, public), keys[2]


@dataclass
class Target:
    name: str
    kind: str  # which seeds
    decode: Callable[[bytes], object]
    resign: object | None = None  # private key that re-signs body mutations


@dataclass
class Tally:
    tried: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    crashes: int = 0
    crash_examples: list[dict] = field(default_factory=list)
    by_mutation: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)


def _rewrap(raw: bytes, template: bytes, resign: object | None, rng: random.Random) -> bytes:
    """``raw`` deflated into a correct envelope of ``template``'s kind (signed again when ``resign``)."""
    _, version, kind, flags, reserved, _, _ = ENVELOPE.unpack_from(template)
    body = zlib.compress(raw, rng.choice((0, 1, 6, 9)))
    signed = resign is not None and flags & FLAG_SIGNED
    env = ENVELOPE.pack(MAGIC, version, kind, flags | FLAG_ZLIB, reserved, len(body), len(raw)) + body
    if signed:
        return env + sign(env, resign)  # type: ignore[arg-type]
    return env + (template[-SIGNATURE_LEN:] if flags & FLAG_SIGNED else b"")


def _mutate_body(raw: bytearray, rng: random.Random) -> bytearray:
    op = rng.randrange(5)
    if op == 0 and raw:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif op == 1 and raw:
        limit = min(len(raw), 600)  # the JSON (hello/ack/key) or the safetensors header lives at the front
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(limit)] = rng.choice(JSONISH)
    elif op == 2:
        del raw[rng.randrange(len(raw) + 1) :]
    elif op == 3 and raw:
        i, j = sorted(rng.randrange(len(raw) + 1) for _ in range(2))
        raw[i:i] = raw[i:j] * rng.randint(1, 3)  # splice a repeated slice
    elif len(raw) >= 8:  # the safetensors header length (or the first JSON bytes)
        struct.pack_into("<Q", raw, 0, rng.choice((0, 1, 2**31, 2**63, len(raw), rng.randrange(2**64))))
    return raw


EDGE_VALUES: tuple[object, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 0.5, -0.0, 1e308, "", "x" * 5000,
    "cluster/0", "client/..", "a/b", "../", "F32", "I32", "U8", "NaN", [], [0], [-1, 2], [2**40, 2**40], {},
    {"a": 1},
)  # fmt: skip
DTYPES = ("F32", "F16", "F64", "I32", "I64", "U8", "I8", "BOOL", "BF16", "XX", "")


def _mutate_json(obj: object, rng: random.Random) -> object:
    """One random leaf or container of ``obj`` replaced, dropped or given an extra key (in place)."""
    spots: list[tuple[object, object]] = []  # (container, key)

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in list(items):
            spots.append((node, k))
            walk(v)

    walk(obj)
    if not spots:
        return rng.choice(EDGE_VALUES)
    container, key = rng.choice(spots)
    op = rng.randrange(6)
    if op == 0 and isinstance(container, dict):
        del container[key]
    elif op == 1 and isinstance(container, dict):
        container[rng.choice(("zz", "__metadata__", "", "x" * 200))] = rng.choice(EDGE_VALUES)
    elif op == 2:
        container[key] = rng.choice(DTYPES)  # type: ignore[index]
    else:
        container[key] = rng.choice(EDGE_VALUES)  # type: ignore[index]
    return obj


def _mutate_fields(raw: bytes, rng: random.Random) -> bytes:
    """Parse the body (JSON, or a safetensors header and its fedhft metadata), change one value, re-serialize."""
    if raw[:1] == b"{":
        return json.dumps(_mutate_json(json.loads(raw), rng)).encode()
    (n,) = struct.unpack_from("<Q", raw)
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if rng.random() < 0.5:  # the fedhft metadata: message fields and tensor encodings
        meta = json.loads(header["__metadata__"]["fedhft"])
        header["__metadata__"]["fedhft"] = json.dumps(_mutate_json(meta, rng))
    else:  # the safetensors table: dtypes, shapes, offsets, names
        header = _mutate_json(header, rng)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _mutate_tensors(raw: bytes, rng: random.Random) -> bytes:
    """A well-formed safetensors body (same metadata) whose tensors break one rule."""
    (n,) = struct.unpack_from("<Q", raw)
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    tensors = dict(st_load(raw))
    name = rng.choice(sorted(tensors))
    arr = tensors[name]
    op = rng.randrange(8)
    if op == 0:
        del tensors[name]
    elif op == 1:
        tensors[name.replace(".", "_", 1) if rng.random() < 0.5 else name + ".x"] = tensors.pop(name)
    elif op == 2:
        tensors[name] = arr.reshape(-1) if arr.ndim > 1 else arr.reshape(1, -1, 1)
    elif op == 3:
        tensors[name] = arr.astype(rng.choice((np.float64, np.int64, np.uint8, np.float16, np.int8)))
    elif op == 4:
        tensors[rng.choice(("layers.9.query.A", "head.extra", "x.B_rows", "#scale"))] = arr.copy()
    elif op in (5, 6) and arr.size:  # a bad value (floats: NaN/inf; indices: negative, repeated, too large)
        bad = arr.copy()
        values = (np.nan, np.inf, -np.inf, 1e30) if arr.dtype.kind == "f" else (-1, 0, 127, 255, 2**31 - 1)
        with np.errstate(all="ignore"):
            bad.flat[rng.randrange(bad.size)] = np.array(rng.choice(values)).astype(bad.dtype)
        tensors[name] = bad[::-1].copy() if op == 6 else bad
    else:
        tensors[name] = np.zeros((0,) + arr.shape[1:], arr.dtype) if arr.ndim else arr
    return bytes(st_save(tensors, metadata=meta))


def mutate(seed: bytes, mutation: str, resign: object | None, rng: random.Random) -> bytes:
    data = bytearray(seed)
    if mutation == "random":
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4096)))
        return (seed[:5] + noise) if rng.random() < 0.5 else noise
    if mutation == "bitflip":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif mutation == "bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.getrandbits(8)))
    elif mutation == "truncate":
        del data[rng.randrange(len(data)) :]
    elif mutation == "extend":
        data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 256)))
    elif mutation == "envelope":
        fields = list(ENVELOPE.unpack_from(data))
        i = rng.randrange(1, 7)
        edge = (0, 1, 2, 3, 4, 5, 6, 255) if i <= 4 else (0, 1, 2**31, 2**32 - 1, rng.getrandbits(32))
        fields[i] = rng.choice(edge) & (0xFF if i <= 4 else 0xFFFFFFFF)
        data[:ENVELOPE_LEN] = ENVELOPE.pack(*fields)
    else:  # body / fields / tensors
        raw = unwrap(seed, seed[5], DEFAULT_MAX_BYTES).raw
        if mutation == "tensors" and raw[:1] != b"{":
            changed = _mutate_tensors(raw, rng)
        elif mutation in ("fields", "tensors"):
            changed = _mutate_fields(raw, rng)
        else:
            changed = bytes(_mutate_body(bytearray(raw), rng))
        return _rewrap(changed, seed, resign, rng)
    return bytes(data)


def run(n: int, seed: int) -> dict:
    seeds, (private, public), key_signer = _seeds()
    targets = [
        Target("decode_update", "update", lambda p: decode_update(p)),
        Target("decode_model (no key: full parsing)", "model", lambda p: decode_model(p)),
        Target("decode_model (edge: verify key)", "model", lambda p: decode_model(p, verify_key=public), private),
        Target("decode_hello", "hello", lambda p: decode_hello(p)),
        Target("decode_ack", "ack", lambda p: decode_ack(p)),
        Target("decode_key_chain", "key", lambda p: decode_key_chain(p), key_signer),
    ]
    rng = random.Random(seed)
    out: dict[str, dict] = {}
    t_all = time.perf_counter()
    for target in targets:
        tally = Tally()
        for s in seeds[target.kind]:  # the seeds themselves must decode
            target.decode(s)
        for _ in range(n):
            mutation = rng.choice(MUTATIONS)
            base = rng.choice(seeds[target.kind])
            payload = mutate(base, mutation, target.resign, rng)
            tally.tried += 1
            tally.by_mutation[mutation] += 1
            t0 = time.perf_counter()
            try:
                target.decode(payload)
                tally.accepted += 1
            except ProtocolError as exc:
                tally.rejected[type(exc).__name__] += 1
            except Exception as exc:  # a crash: the figure this bench exists for
                tally.crashes += 1
                if len(tally.crash_examples) < 5:
                    tally.crash_examples.append(
                        {
                            "mutation": mutation,
                            "error": f"{type(exc).__name__}: {exc}"[:300],
                            "payload_hex": payload[:256].hex(),
                            "trace": traceback.format_exc()[-800:],
                        }
                    )
            tally.seconds.append(time.perf_counter() - t0)
        out[target.name] = {
            "tried": tally.tried,
            "accepted": tally.accepted,
            "rejected": sum(tally.rejected.values()),
            "rejected_by_error": dict(tally.rejected.most_common()),
            "crashes": tally.crashes,
            "crash_examples": tally.crash_examples,
            "by_mutation": dict(sorted(tally.by_mutation.items())),
            "p99_decode_ms": round(float(np.percentile(tally.seconds, 99)) * 1000, 3),
            "max_decode_ms": round(max(tally.seconds) * 1000, 2),  # wall time on a shared machine: noisy
        }
        print(
            f"{target.name:40s} tried {tally.tried:6d}  rejected {sum(tally.rejected.values()):6d}  "
            f"accepted {tally.accepted:5d}  crashes {tally.crashes}  p99 {out[target.name]['p99_decode_ms']} ms",
            flush=True,
        )
    return {
        "seed": seed,
        "per_decoder": n,
        "mutations": list(MUTATIONS),
        "decoders": out,
        "tried": sum(d["tried"] for d in out.values()),
        "crashes": sum(d["crashes"] for d in out.values()),
        "seconds": round(time.perf_counter() - t_all, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="Messages per decoder.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    args = ap.parse_args()
    result = run(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['tried']} messages, {result['crashes']} crashes, {result['seconds']} s -> {args.out}")
    return 0 if result["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
