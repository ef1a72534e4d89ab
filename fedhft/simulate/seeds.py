"""`fedhft simulate --seeds`: every method (and upload encoding) once per seed, each run in its own directory.

One seed keeps the old layout (OUT/<run>/); several put each seed's runs under OUT/seed-<s>/<run>/. A seed
changes the data split, the clients' training order and the server's clustering, never the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from fedhft.protocol.encodings import ENCODINGS
from fedhft.simulate.config import DEFAULT_ENCODING, SimConfig, SimulationError
from fedhft.simulate.methods import MethodSpec

Run = Callable[..., dict]


def parse_seeds(text: str | None, base: int = 0) -> list[int]:
    """'3' -> [base, base+1, base+2]; '0,4,7' -> [0, 4, 7]; None -> [base]."""
    if text is None or not text.strip():
        return [base]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError as e:
        raise SimulationError(f"--seeds {text!r}: give a count (3) or a comma-separated list (0,1,2)") from e
    if len(parts) == 1 and "," not in text:
        if values[0] < 1:
            raise SimulationError(f"--seeds {text!r}: the number of seeds must be >= 1")
        return list(range(base, base + values[0]))
    if len(set(values)) != len(values):
        raise SimulationError(f"--seeds {text!r}: a seed is listed twice")
    return values


def parse_encodings(text: str) -> list[str]:
    """'fp16,int8' -> ['fp16', 'int8'] (each one of the wire's encodings, none twice)."""
    encs = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in encs if e not in ENCODINGS]
    if bad or not encs or len(set(encs)) != len(encs):
        raise SimulationError(f"--encoding {text!r}: a comma-separated list of distinct {', '.join(ENCODINGS)}")
    return encs


def seed_out(out: Path, seed: int, seeds: Sequence[int]) -> Path:
    """Where one seed's runs go: OUT itself for a single seed, OUT/seed-<s> for several."""
    return out if len(seeds) == 1 else out / f"seed-{seed}"


def run_seeds(
    base: SimConfig,
    specs: Sequence[MethodSpec],
    seeds: Sequence[int],
    encodings: Sequence[str] = (DEFAULT_ENCODING,),
    chaos: str | None = None,
    run: Run | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One result per (seed, method, encoding), seeds outermost (a finished seed is a complete comparison);
    with ``chaos`` each clean run is followed by the same run under faults."""
    from fedhft.simulate import runner

    run_one = run or runner.run

    results = []
    for seed in seeds:
        for spec in specs:
            for enc in encodings:
                cfg = replace(base, method=spec, seed=seed, encoding=enc, out=seed_out(base.out, seed, seeds))
                cfg.out.mkdir(parents=True, exist_ok=True)
                clean = run_one(cfg, progress=progress)
                results.append(clean)
                if chaos:
                    faulty = run_one(replace(cfg, chaos=chaos), progress=progress)
                    results.append(runner.with_clean_reference(faulty, clean))
    return results
