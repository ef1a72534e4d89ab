"""``flexlora``: FlexLoRA, the sample-weighted mean of the clients' B_k·A_k (dense uploads only), SVD to each
client's rank: the ΔW path of :mod:`~fedhft.broker_server.strategies.fedhft` without masks or clustering.

Like fedhft it aggregates FedBuff changes: ΔW += η · Σ_k n_k s_k (B_k·A_k − R_k) / Σ_k n_k, R_k the truncation the
client received. Synchronously (fresh updates, η = 1) this is the paper's Σ_k n_k B_k·A_k / Σ_k n_k plus what the
global ΔW holds beyond the clients' ranks (ΔW − Σ_k n_k R_k / Σ_k n_k), which the paper's rule drops every round
and this one keeps; the two are equal when every client's rank holds the global ΔW (R_k = ΔW).
"""

from __future__ import annotations

from fedhft.broker_server.strategies.fedhft import FedHFT


class FlexLoRA(FedHFT):
    """FedHFT's ΔW aggregation and SVD, fed dense uploads, one cluster."""

    name = "flexlora"
    accepts_masked = False
    clusters = False
