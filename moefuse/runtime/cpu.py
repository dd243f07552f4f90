"""The CPU path of `moefuse::moe`: an exact torch implementation of the same plan the kernels run.

Plan (identical to the Triton path, so the two can be compared step by step):
  1. routing: pairs p = t·K + k sorted stably by expert → order[S], per-expert counts;
  2. up-projection per expert on the gathered rows x[order // K], activation from the spec's expression;
  3. down-projection per expert;
  4. combine: y[t] = Σ_k w[t,k] · Y[pair (t,k)], accumulated in fp32, cast to the spec's out dtype.

On the CPU a host read of the counts costs nothing (there is no device to sync with), so experts are walked
with plain slices. The activation is evaluated in fp32 like the kernels' epilogue.
"""
from __future__ import annotations

import torch

from moefuse import expr as _expr
from moefuse.spec import MoESpec


def _activation(spec: MoESpec):
    return _expr.torch_fn(spec.activation.expr, spec.activation.num_inputs)


def expert_slices(up: torch.Tensor, spec: MoESpec) -> list[torch.Tensor]:
    """The activation's inputs: for variable j, column n reads up-projection row off_j + step_j · n."""
    n = spec.intermediate
    return [up[:, off : off + step * (n - 1) + 1 : step] for off, step in spec.activation.slices]


def moe_forward_cpu(
    spec: MoESpec,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[T, H] for the layer `spec`; see `moefuse.spec` for the layouts. Works on any device."""
    T, K = topk_ids.shape
    out_dtype = getattr(torch, spec.out_dtype)
    if T == 0:
        return x.new_zeros((0, spec.hidden), dtype=out_dtype)
    act = _activation(spec)
    e_count = spec.num_experts
    flat = topk_ids.reshape(-1)
    # Ids outside [0, E) belong to no expert and contribute nothing (as in the kernels): they get the key E,
    # which sorts after every expert, and their rows stay zero.
    key = torch.where((flat >= 0) & (flat < e_count), flat, e_count)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=e_count + 1).tolist()
    xs = x[order // K]
    a = x.new_empty((T * K, spec.intermediate))
    y_sorted = x.new_zeros((T * K, spec.hidden))
    start = 0
    for e, c in enumerate(counts[:e_count]):
        if c == 0:
            continue
        rows = slice(start, start + c)
        up = xs[rows] @ w1[e].transpose(0, 1)
        if b1 is not None:
            up = up + b1[e]
        a[rows] = act(*(s.float() for s in expert_slices(up, spec))).to(a.dtype)
        down = a[rows] @ w2[e].transpose(0, 1)
        if b2 is not None:
            down = down + b2[e]
        y_sorted[rows] = down
        start += c
    y_pairs = torch.empty_like(y_sorted)
    y_pairs[order] = y_sorted
    y = (y_pairs.view(T, K, spec.hidden).float() * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return y.to(out_dtype)
