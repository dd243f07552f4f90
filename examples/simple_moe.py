"""A Mixture-of-Experts block written the way a researcher would, in plain PyTorch.

Every expert runs on every token (two einsums), and the top-k routing weights are scattered into a dense
[T, E] matrix for the combine. Dynamo captures it whole; moefuse recognises it and runs only the selected
(token, expert) pairs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimpleMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, glu: bool = True,
                 activation=F.silu):
        super().__init__()
        self.top_k, self.glu, self.activation = top_k, glu, activation
        self.router = nn.Linear(hidden, num_experts, bias=False)
        rows = 2 * intermediate if glu else intermediate
        self.w1 = nn.Parameter(torch.randn(num_experts, rows, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        h = torch.einsum("th,enh->ten", x, self.w1)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            a = self.activation(gate) * up
        else:
            a = self.activation(h)
        y = torch.einsum("ten,ehn->teh", a, self.w2)
        dense = torch.zeros_like(probs).scatter(1, ids, weights)
        return (y * dense.unsqueeze(-1)).sum(dim=1).reshape(shape)


class SimpleMoEModel(nn.Module):
    """Two MoE blocks with residuals and norms: the smallest model with more than one MoE layer."""

    def __init__(self, hidden=64, intermediate=32, num_experts=8, top_k=2, layers=2):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(SimpleMoE(hidden, intermediate, num_experts, top_k) for _ in range(layers))

    def forward(self, x):
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return x
