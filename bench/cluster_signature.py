"""Which signature clusters clients best: the classifier head, the adapted-layer ΔW sketch, or both.

Synthetic non-IID clients from G ground-truth groups (numpy only, no model): C = 5 classes, hidden 48, four
adapted 48 x 48 modules, rank-4 masked uploads of half the rows. A client's label mix q ~ Dirichlet(κ π_g)
around its group's π_g. Its head is the class directions scaled by its label mix plus log-prior biases plus
noise; its ΔW per module is a shared task part, a label part Σ_c q_c D_c (per-class directions), a domain
part of its group (scenarios with covariate shift) and SGD noise, truncated to rank 4 on its sent rows. The
rows sent are the device's rule (edge_runtime/masking.py): those whose change this round (the client's own
parts, noise and 0.3 x the task part) has the largest norm; ``--masks random`` sends a random half instead.
Scenarios:
- label-skew: groups differ in π_g (Dirichlet 0.5), no domain part (BBC split by Dirichlet α);
- domain-shift: π_g uniform, groups differ in a domain direction (heads barely differ);
- mixed: both (Clothing split by department).

Each signature goes through the server's own path (reclustering.client_signatures, PCA, cluster_fit.fit_clusters
with the default minimum size 2, cluster_fit.soften with the default floor) for K = auto (BIC in 1..5) and for
K = G, at PCA dimensions 2, 3, 4 and 8. Reported per (PCA dims, scenario, clients, groups, signature), mean ±
std over seeds: adjusted Rand index (ARI) of the auto-K and fixed-K partitions, the chosen K, the entropy of
the raw GMM posterior and of the floored memberships (0 one-hot, 1 uniform). The defaults (--cluster-signature
and FederationConfig.pca_dims) are the pair with the best mean auto-K ARI over every case.

Writes bench/results/cluster_signature.json and prints a table. Run: `.venv/bin/python bench/cluster_signature.py
[--seeds N]` (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import ClientUpdate, MaskedFactors
from fedhft.broker_server.cluster_fit import fit_clusters, membership_entropy, soften
from fedhft.broker_server.clustering import adjusted_rand_index, pca
from fedhft.broker_server.federation import FederationConfig
from fedhft.broker_server.reclustering import SIGNATURES, client_signatures, delta_sketch

CLASSES, HIDDEN, MODULES, RANK, MASK = 5, 48, 4, 4, 0.5
SCENARIOS = ("label-skew", "domain-shift", "mixed")
CASES = ((8, 2), (8, 3), (50, 3), (50, 4))  # (clients, groups)
PCA_DIMS = (2, 3, 4, 8)
K_RANGE = (1, 5)
OUT = Path(__file__).parent / "results" / "cluster_signature.json"


def synthetic_clients(
    scenario: str, n: int, groups: int, rng: np.random.Generator, masks: str = "top"
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], np.ndarray]:
    """(heads, ΔW sketches, group labels) of ``n`` clients from ``groups`` groups."""
    label_skew, domain = scenario in ("label-skew", "mixed"), scenario in ("domain-shift", "mixed")
    mu = rng.standard_normal((CLASSES, HIDDEN)) / np.sqrt(HIDDEN)  # class directions of the head
    task = [rng.standard_normal((HIDDEN, 2)) @ rng.standard_normal((2, HIDDEN)) / HIDDEN for _ in range(MODULES)]
    per_class = [
        [np.outer(rng.standard_normal(HIDDEN), rng.standard_normal(HIDDEN)) / HIDDEN for _ in range(CLASSES)]
        for _ in range(MODULES)
    ]
    dom = [
        [np.outer(rng.standard_normal(HIDDEN), rng.standard_normal(HIDDEN)) / HIDDEN for _ in range(MODULES)]
        for _ in range(groups)
    ]
    pi = rng.dirichlet(np.full(CLASSES, 0.5), size=groups) if label_skew else np.full((groups, CLASSES), 1 / CLASSES)
    labels = np.arange(n) % groups
    rng.shuffle(labels)
    heads, sketches = {}, {}
    for i, g in enumerate(labels):
        cid = f"c{i:02d}"
        q = rng.dirichlet(10.0 * pi[g] + 1e-3)
        w = mu * (1.0 + 2.0 * (CLASSES * q - 1.0))[:, None] + 0.3 * rng.standard_normal(mu.shape) / np.sqrt(HIDDEN)
        b = 0.5 * np.log(q + 0.02) + 0.1 * rng.standard_normal(CLASSES)
        heads[cid] = {"head.weight": w, "head.bias": b}
        modules = {}
        for m in range(MODULES):
            own = 0.5 * sum(qc * d for qc, d in zip(q, per_class[m], strict=True)) + (0.3 * dom[g][m] if domain else 0)
            noise = 0.05 * rng.standard_normal(task[m].shape) / np.sqrt(HIDDEN)
            dw, change, k = task[m] + own + noise, 0.3 * task[m] + own + noise, int(MASK * HIDDEN)
            if masks == "random":
                rows = np.sort(rng.choice(HIDDEN, size=k, replace=False))
            else:
                rows = np.sort(np.argsort(-np.linalg.norm(change, axis=1), kind="stable")[:k])
            u, s, vt = np.linalg.svd(dw[rows], full_matrices=False)
            modules[f"layers.{m}.query"] = MaskedFactors(vt[:RANK], u[:, :RANK] * s[:RANK], rows, HIDDEN)
        sketch = delta_sketch(ClientUpdate(cid, 1, 0, modules, {}))
        assert sketch is not None
        sketches[cid] = sketch
    return heads, sketches, labels


def evaluate(
    source: str, heads: dict, sketches: dict, labels: np.ndarray, groups: int, cfg: FederationConfig, seed: int
) -> dict[str, float]:
    """ARI (auto K and K = groups), chosen K and membership entropies of one signature on one client set."""
    empty = [ClusterState({}, {})]  # no cluster heads yet: the reference head is the clients' mean
    ids, x = client_signatures(source, sorted(heads), heads, sketches, empty, np.ones(1))
    truth = labels[[int(c[1:]) for c in ids]]
    xp = pca(x, min(cfg.pca_dims, len(ids) - 1))
    auto = fit_clusters(xp, k_min=K_RANGE[0], k_max=K_RANGE[1], min_size=cfg.min_cluster_size, seed=seed)
    fixed = fit_clusters(xp, k_min=groups, k_max=groups, min_size=cfg.min_cluster_size, seed=seed)
    figures = {
        "ari_auto": adjusted_rand_index(truth, auto.resp.argmax(1)),
        "k_auto": float(auto.k),
        "ari_fixed": adjusted_rand_index(truth, fixed.resp.argmax(1)),
        "entropy_raw": membership_entropy(fixed.resp),
        "entropy_floored": membership_entropy(soften(fixed.resp, cfg.membership_floor)),
    }
    return {k: round(v, 4) for k, v in figures.items()}


def summary(dims: int, scenario: str, n: int, groups: int, source: str, seeds: list[dict[str, float]]) -> dict:
    """One table row: mean and std over seeds of every figure, and the per-seed figures."""
    row: dict = {"pca_dims": dims, "scenario": scenario, "clients": n, "groups": groups, "signature": source}
    for key in seeds[0]:
        v = np.array([r[key] for r in seeds])
        row[key] = {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4)}
    row["seeds"] = seeds
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"{'pca':>3} {'scenario':<13} {'n':>3} {'G':>2} {'signature':<9} {'ARI auto':>13} {'K auto':>6} "
        f"{'ARI K=G':>13} {'H raw':>6} {'H floored':>9}"
    )
    for r in rows:
        ms = {k: r[k]["mean"] for k in ("ari_auto", "k_auto", "ari_fixed", "entropy_raw", "entropy_floored")}
        print(
            f"{r['pca_dims']:>3} {r['scenario']:<13} {r['clients']:>3} {r['groups']:>2} {r['signature']:<9} "
            f"{ms['ari_auto']:>6.3f} ± {r['ari_auto']['std']:.3f} {ms['k_auto']:>6.2f} "
            f"{ms['ari_fixed']:>6.3f} ± {r['ari_fixed']['std']:.3f} {ms['entropy_raw']:>6.3f} "
            f"{ms['entropy_floored']:>9.3f}"
        )


def dump(result: dict) -> str:
    """The result as JSON with one line per table row."""
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)[:-2]
    return head + ',\n "rows": [\n  ' + ",\n  ".join(json.dumps(r) for r in result["rows"]) + "\n ]\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--masks", choices=("top", "random"), default="top", help="Rows a client sends (see above).")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    default = FederationConfig()  # the server's defaults: min cluster size, membership floor, signature, PCA dims
    rows = []
    for dims in PCA_DIMS:
        cfg = dataclasses.replace(default, pca_dims=dims)
        for scenario in SCENARIOS:
            for n, groups in CASES:
                runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIGNATURES}
                for seed in range(a.seeds):
                    clients = synthetic_clients(scenario, n, groups, np.random.default_rng(seed), a.masks)
                    for source in SIGNATURES:
                        runs[source].append(evaluate(source, *clients, groups, cfg, seed))
                rows += [summary(dims, scenario, n, groups, source, seeds) for source, seeds in runs.items()]
    score = {
        (d, s): float(np.mean([r["ari_auto"]["mean"] for r in rows if (r["pca_dims"], r["signature"]) == (d, s)]))
        for d in PCA_DIMS
        for s in SIGNATURES
    }
    worst = {  # the scenario where the pair does worst (mean auto-K ARI over its cases)
        key: min(
            float(
                np.mean(
                    [
                        r["ari_auto"]["mean"]
                        for r in rows
                        if (r["pca_dims"], r["signature"], r["scenario"]) == (*key, sc)
                    ]
                )
            )
            for sc in SCENARIOS
        )
        for key in score
    }
    best = max(score, key=lambda key: score[key])
    print_table(rows)
    print("auto-K ARI (PCA dims x signature): mean over every case / mean of the worst scenario")
    for d in PCA_DIMS:
        print(f"  {d}: " + ", ".join(f"{s} {score[d, s]:.3f} / {worst[d, s]:.3f}" for s in SIGNATURES))
    robust = max(worst, key=lambda key: worst[key])
    print(
        f"chosen: --cluster-signature {best[1]} with pca_dims {best[0]} (best mean auto-K ARI {score[best]:.3f}; "
        f"best worst-scenario pair: {robust[1]}, pca_dims {robust[0]}); "
        f"server defaults now: {default.cluster_signature}, pca_dims {default.pca_dims}"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "seeds": a.seeds,
        "masks": a.masks,
        "k_range": list(K_RANGE),
        "min_cluster_size": default.min_cluster_size,
        "membership_floor": default.membership_floor,
        "mean_ari_auto": {f"pca{d}/{s}": round(v, 4) for (d, s), v in score.items()},
        "worst_scenario_ari_auto": {f"pca{d}/{s}": round(v, 4) for (d, s), v in worst.items()},
        "best": {"cluster_signature": best[1], "pca_dims": best[0]},
        "rows": rows,
    }
    a.out.write_text(dump(result))


if __name__ == "__main__":
    main()
