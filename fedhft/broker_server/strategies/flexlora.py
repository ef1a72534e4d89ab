"""``flexlora``: FlexLoRA, the sample-weighted mean of the clients' B_k·A_k (dense uploads only), SVD to each
client's rank: the ΔW path of :mod:`~fedhft.broker_server.strategies.fedhft` without masks or clustering."""

from __future__ import annotations

from fedhft.broker_server.strategies.fedhft import FedHFT


class FlexLoRA(FedHFT):
    """FedHFT's ΔW aggregation and SVD, fed dense uploads, one cluster."""

    name = "flexlora"
    accepts_masked = False
    clusters = False
