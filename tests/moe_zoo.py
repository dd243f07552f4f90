"""Hand-written MoE modules in the spellings real code uses, for tests of capture and detection.

Each module is a complete MoE block `[T, H] → [T, H]`; its docstring says which form it exercises.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupedMMMoE(nn.Module):
    """Sort-based dispatch into `F.grouped_mm`, the way hand-written MoE code (torchtitan, many research repos)
    spells it: `argsort` of the flat expert ids, `bincount` counts → int32 `cumsum` offsets, a gather
    `x[order // K]`, SwiGLU by `chunk`, un-permute by index assignment, weighted sum over K.

    `bincount` has a data-dependent output shape: without dynamo's `capture_dynamic_output_shape_ops` the block
    is split in two graphs at that line. `F.grouped_mm`'s shape function (torch 2.13) accepts only bf16 while
    tracing, so the module is meant to run in bf16.
    """

    def __init__(self, hidden: int = 32, intermediate: int = 16, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate) / hidden ** 0.5)  # [E, H, 2I]
        self.w_down = nn.Parameter(torch.randn(num_experts, intermediate, hidden) / intermediate ** 0.5)  # [E, I, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, K = x.shape[0], self.top_k
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = torch.topk(probs, K, dim=-1)  # [T, K]
        flat_ids = ids.flatten()  # [T·K]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        rows = x[order // K]  # [T·K, H], expert-sorted
        gate, up = F.grouped_mm(rows, self.w_up, offs=offsets).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.w_down, offs=offsets)  # [T·K, H]
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        y = unsorted.view(T, K, -1).float() * weights.unsqueeze(-1)
        return y.sum(dim=1).to(x.dtype)


class GroupedMMModel(nn.Module):
    """Two `GroupedMMMoE` blocks with a residual around each (a stand-in for a decoder stack)."""

    def __init__(self, hidden: int = 32, intermediate: int = 16, num_experts: int = 4, top_k: int = 2, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(GroupedMMMoE(hidden, intermediate, num_experts, top_k) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class PrintingMoE(GroupedMMMoE):
    """The same block with a `print` of the expert counts between dispatch and experts: a graph break no dynamo
    setting removes, inside the MoE, so the block spans two graphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, K = x.shape[0], self.top_k
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = torch.topk(probs, K, dim=-1)
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        print("tokens per expert", counts)
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        rows = x[order // K]
        gate, up = F.grouped_mm(rows, self.w_up, offs=offsets).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.w_down, offs=offsets)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return (unsorted.view(T, K, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
