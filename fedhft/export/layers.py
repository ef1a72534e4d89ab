"""Frozen int8 base layers and the LoRA adapter that wraps them (y = W_q x + s * B A x)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one fp32 scale per row (per output channel / per token)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class FrozenLinear(nn.Module):
    """A frozen linear layer, stored as int8 + per-output-channel scale or as fp32."""

    def __init__(self, linear: nn.Linear, int8: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.int8 = int8
        if int8:
            q, scale = quantize_rows(linear.weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", scale)
        else:
            self.register_buffer("weight", linear.weight.detach().clone())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def dequantized_weight(self) -> torch.Tensor:
        if self.int8:
            return self.weight_q.to(torch.float32) * self.weight_scale[:, None]
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class FrozenEmbedding(nn.Module):
    """A frozen embedding table; int8 tables dequantize only the rows a batch gathers."""

    def __init__(self, embedding: nn.Embedding, int8: bool) -> None:
        super().__init__()
        self.int8 = int8
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        if int8:
            q, scale = quantize_rows(embedding.weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", scale)
        else:
            self.register_buffer("weight", embedding.weight.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8:
            rows = F.embedding(ids, self.weight_q).to(torch.float32)
            return rows * F.embedding(ids, self.weight_scale[:, None])
        return F.embedding(ids, self.weight)


class LoraLinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update: y = base(x) + (alpha / r) * B(A(x))."""

    def __init__(self, base: FrozenLinear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        a = torch.empty(rank, base.in_features)
        # Kaiming-uniform A, zero B: the adapter starts as the identity update (as in LoRA and peft).
        bound = math.sqrt(6.0 / ((1 + 5) * base.in_features))
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
