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


class SplitByCountsMoE(GroupedMMMoE):
    """Sort-based dispatch whose experts run in a Python loop over `rows.split(counts.tolist())`, the counts from
    `torch.histc` as torchtitan computes them: `.tolist()` is a host read (a graph break unless dynamo's
    `capture_scalar_outputs` is on). Any dtype.

    `counts_by="bincount"` counts with `torch.bincount(ids, minlength=E)` instead, whose *length* is
    data-dependent when dynamo captures it: `.tolist()` of it cannot be traced (dynamo raises
    GuardOnDataDependentSymNode); `counts_by="bincount[:E]"` gives it a static length, which can."""

    def __init__(self, *args, counts_by: str = "histc", **kwargs):
        super().__init__(*args, **kwargs)
        self.counts_by = counts_by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, K, E = x.shape[0], self.top_k, self.num_experts
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = torch.topk(probs, K, dim=-1)
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        if self.counts_by == "histc":
            counts = torch.histc(flat_ids.float(), bins=E, min=0, max=E - 1).long()
        elif self.counts_by == "bincount":
            counts = torch.bincount(flat_ids, minlength=E)
        else:
            counts = torch.bincount(flat_ids, minlength=E)[:E]
        rows = x[order // K]
        outs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            gate, up = (chunk @ self.w_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.w_down[e])
        out = torch.cat(outs)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return (unsorted.view(T, K, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
