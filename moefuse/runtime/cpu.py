"""The CPU path of `moefuse::moe` and of its training pair, forward and SonicMoE's memory-efficient backward.

Each call runs the C++ kernels generated for the layer (`moefuse.kernels.cpu`) when they can take it (fp32 or
bf16, weights with a unit stride, a C++ compiler; `kernels.cpu.unavailable` says why not), else the torch plan
below: an exact torch implementation of the same plan, which also serves float64 (gradcheck) and fp16, and is
the tests' reference.

Forward plan (identical to the Triton path, so the two can be compared step by step):
  1. routing: pairs p = t·K + k sorted stably by expert → order[S], per-expert counts (ids outside [0, E)
     sort last and belong to no expert);
  2. up-projection per expert on the gathered rows x[order // K]: H = x·W1ᵀ + b1, kept as `h` for backward
     when asked; activation A = act(H) from the spec's expression, in fp32;
  3. down-projection per expert: Y = A·W2ᵀ + b2;
  4. combine: y[t] = Σ_k w[t,k] · Y[pair (t,k)], accumulated in fp32, cast to the spec's out dtype.

Backward (SonicMoE, "memory-efficient backward"): from x, the routing and H only — A is recomputed, Y and dY
never exist. Per expert, on its sorted rows with s = topk_w of each row's pair:
  dA' = gather(dy)·W2_e              dS = ⟨dA', A⟩ (+ ⟨dy_t, b2_e⟩)   → dtopk_w[t, k]
  dH  = s·dA' ⊙ ∂act/∂x_j(H)         (scattered to the up-projection rows the activation read)
  dW2_e = gather(dy)ᵀ·(s·A)          dW1_e = dHᵀ·gather(x)            db2_e = Σ s·dy_t,  db1_e = Σ dH
  dx = Σ_k dH·W1_e over each token's pairs (unweighted: the weight is already in dH).

Gate and up as two tensors (`MoESpec.w3`): the up-projection is the virtual [w1; w3], computed as two grouped
GEMMs into the two column halves of H (the weights are never concatenated), so H, the activation and every
formula above keep their layout; the backward splits dH the same way: dW1_e = dH[:, :I]ᵀ·x, dW3_e =
dH[:, I:]ᵀ·x, dx = Σ_k dH[:, :I]·W1_e + dH[:, I:]·W3_e.

Flat pairs (`moefuse::moe_pairs`, a variable number of experts per token: `moe_pairs_forward_cpu`,
`moe_pairs_backward_cpu`) run the same plan with the token of pair p read from pair_token instead of p // K;
each token's rows are then summed with index_add (pairs in order) instead of the [T, K] batched matmul.

On the CPU a host read of the counts costs nothing (there is no device to sync with), so experts are walked
with plain slices. Math runs in fp32 for the spec's dtypes (fp32/fp16/bf16), like the kernels' epilogues;
the functions are dtype-generic, and float64 tensors (which no MoESpec describes) run in float64, which is
what `torch.autograd.gradcheck` needs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from moefuse import expr as _expr
from moefuse.kernels import cpu as _kernels
from moefuse.spec import MoESpec


def _activation(spec: MoESpec) -> Callable[..., torch.Tensor]:
    return _expr.torch_fn(spec.activation.expr, spec.activation.num_inputs)


@functools.lru_cache(maxsize=None)
def _activation_grads(expression: str, num_inputs: int) -> tuple[Callable[..., torch.Tensor], ...]:
    # Cached here: `expr.gradient` differentiates with sympy (tens of ms), torch_fn only caches the printing.
    return tuple(_expr.torch_fn(g, num_inputs) for g in _expr.gradient(expression, num_inputs))


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 tensors, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def expert_slices(up: torch.Tensor, spec: MoESpec) -> list[torch.Tensor]:
    """The activation's inputs: for variable j, column n reads up-projection row off_j + step_j · n (views)."""
    n = spec.intermediate
    return [up[:, off : off + step * (n - 1) + 1 : step] for off, step in spec.activation.slices]


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(order [S] int64, counts): the pair p = t·K + k of each expert-sorted row, and the rows of each expert.

    The same order as `moefuse.kernels.routing.routing_plan_reference`: a stable sort by expert, ids outside
    [0, E) under the key E, so they come last (rows counts-sum .. S-1) and belong to no expert.
    """
    flat = topk_ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()[:num_experts]
    return order, counts


def _grouped_mm_takes(*operands: torch.Tensor) -> bool:
    """Whether torch's CPU grouped_mm accepts these operands: CPU, not float64, 16-byte aligned data, one unit
    stride (row- or column-major matrices) and every other stride a multiple of 16 bytes — its own check
    raises otherwise ("strides should be multiple of 16 bytes")."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False

    def takes(t: torch.Tensor) -> bool:
        strides = list(t.stride())
        fastest = strides.index(1) if 1 in strides else -1
        others = [st for i, st in enumerate(strides) if i != fastest]
        return (t.device.type == "cpu" and t.dtype != torch.float64 and t.data_ptr() % 16 == 0 and fastest >= 0
                and all((st * t.element_size()) % 16 == 0 for st in others))

    return all(takes(t) for t in operands)


def _grouped_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, counts: list[int],
                    rows: int | None = None) -> torch.Tensor:
    """out[rows of e] = a[rows of e] · w[e]ᵀ + b[e] over the expert-sorted rows; rows past Σcounts are zero.

    `w` is [E, out, in] with any strides. On the CPU one `F.grouped_mm` call runs every expert (measured
    0.55–0.85× the time of a Python loop of `torch.mm` at the benchmarks/cpu.py shapes, most at decode, where
    the loop's per-expert overhead dominates); elsewhere (the verification probe on a GPU, torch without
    grouped_mm, float64 for gradcheck) a loop of `torch.mm` writing into the output rows.
    """
    kept = sum(counts)
    out = a.new_empty((rows if rows is not None else a.shape[0], w.shape[1]))
    if kept and _grouped_mm_takes(a, w.transpose(1, 2)):
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        out[:kept] = torch.nn.functional.grouped_mm(a[:kept], w.transpose(1, 2), offs=offs)
    else:
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(a[start : start + c], w[e].transpose(0, 1), out=out[start : start + c])
            start += c
    if b is not None and kept:
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=a.device),
                                                torch.tensor(counts, device=a.device))
        out[:kept] += b.index_select(0, expert_of_row).to(out.dtype)
    out[kept:] = 0
    return out


def moe_forward_cpu(
    spec: MoESpec,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    save_h: bool = False,
    out_dtype: torch.dtype | None = None,
    w3: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y[T, H] for the layer `spec`; see `moefuse.spec` for the layouts. Works on any device.

    save_h: return (y, h) instead, h [T·K, N1] in x's dtype, in expert-sorted order (see `sort_pairs`),
      column c = up-projection row c before the activation (b1 included); rows of dropped pairs are zero.
    out_dtype: dtype of y (default: spec.out_dtype); float64 for gradcheck.
    w3: the up weights [E, I, H] when the spec holds gate and up apart (`MoESpec.w3`); w1 is then the gate's.
    """
    return _forward(spec, x, _Pairs.from_top_k(topk_ids, topk_weights), w1, w2, b1, b2, save_h, out_dtype, w3)


def moe_pairs_forward_cpu(
    spec: MoESpec,
    x: torch.Tensor,
    pair_token: torch.Tensor,
    pair_expert: torch.Tensor,
    pair_weight: torch.Tensor,
    token_offsets: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    save_h: bool = False,
    out_dtype: torch.dtype | None = None,
    w3: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`moe_forward_cpu` on flat pairs (`moefuse.runtime.pairs`): y[T, H], y[t] = Σ over t's pairs p of
    pair_weight[p] · expert pair_expert[p] applied to x[t]; h is [S_max, N1]. Unused slots (expert outside
    [0, E)) contribute nothing whatever their token. token_offsets is not read: pair_token says the same."""
    del token_offsets
    return _forward(spec, x, _Pairs.from_flat(pair_token, pair_expert, pair_weight, x.shape[0], spec.num_experts),
                    w1, w2, b1, b2, save_h, out_dtype, w3)


class _Pairs(NamedTuple):
    """Both routing forms as flat pairs: expert [S], weight [S] and token [S] (int64, in [0, T)) of each pair;
    top_k is K for a [T, K] top-k (pairs t·K + k: the combine is a batched matmul over K; token is None there,
    `tokens()` makes p // K where the torch plan needs it), None for flat pairs (the combine sums each token's
    pairs with index_add)."""

    expert: torch.Tensor
    weight: torch.Tensor
    token: torch.Tensor | None
    num_tokens: int
    top_k: int | None

    def tokens(self) -> torch.Tensor:
        if self.token is not None:
            return self.token
        return torch.arange(self.expert.numel(), device=self.expert.device) // max(self.top_k, 1)

    @classmethod
    def from_top_k(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _Pairs:
        T, K = topk_ids.shape
        return cls(topk_ids.reshape(-1), topk_weights.reshape(-1), None, T, K)

    @classmethod
    def from_flat(cls, pair_token, pair_expert, pair_weight, num_tokens: int, num_experts: int) -> _Pairs:
        # An unused slot's token is unspecified: token 0 (in range) for it; its rows are zero, so it adds nothing.
        used = (pair_expert >= 0) & (pair_expert < num_experts)
        token = torch.where(used, pair_token.long(), 0)
        return cls(pair_expert, pair_weight, token, num_tokens, None)


def _forward(spec: MoESpec, x, pairs: _Pairs, w1, w2, b1, b2, save_h: bool, out_dtype, w3=None):
    out_dtype = out_dtype or getattr(torch, spec.out_dtype)
    if _kernels.unavailable(spec, x, w1, w2, w3, out_dtype) is None:
        y, h = _kernels.forward(spec, x, pairs.expert, pairs.weight, pairs.token, pairs.top_k or 0, w1, w2, b1, b2,
                                w3, save_h, out_dtype)
        return (y, h) if save_h else y
    return _torch_forward(spec, x, pairs, w1, w2, b1, b2, save_h, out_dtype, w3)


def _torch_forward(spec: MoESpec, x, pairs: _Pairs, w1, w2, b1, b2, save_h: bool, out_dtype, w3=None):
    """The torch plan of `_forward` (module docstring), where the generated kernels cannot run."""
    T, S = pairs.num_tokens, pairs.expert.numel()
    math = _math_dtype(x.dtype)
    h = x.new_zeros((S, spec.up_rows)) if save_h else None
    if T == 0:
        y = x.new_zeros((0, spec.hidden), dtype=out_dtype)
        return (y, h) if save_h else y
    act = _activation(spec)
    order, counts = sort_pairs(pairs.expert, spec.num_experts)
    kept = sum(counts)  # rows of pairs that belong to an expert; the rest (dropped ids) stay zero
    xs = x.index_select(0, pairs.tokens()[order])
    if w3 is None:
        up = _grouped_linear(xs, w1, b1, counts)
    else:  # the virtual [w1; w3]: two GEMMs into the column halves of H, the weights are never concatenated
        I = spec.intermediate  # noqa: E741
        up = xs.new_empty((S, 2 * I))
        up[:, :I] = _grouped_linear(xs, w1, None, counts)
        up[:, I:] = _grouped_linear(xs, w3, None, counts)
    if h is not None:
        h[:kept] = up[:kept]
    # One activation over every row at once: it is elementwise, so this is what per-expert calls would give.
    a = act(*(s.to(math) for s in expert_slices(up[:kept], spec))).to(x.dtype)
    y_sorted = _grouped_linear(a, w2, b2, counts, rows=S)
    # Combine: back to pair order (inverse permutation), then sum each token's weighted rows in fp32 in a fixed
    # order, no atomics — for [T, K] one batched matmul y[t] = w[t, :] · Y[t, :, :].
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    y_pairs = y_sorted.index_select(0, pos).to(math)
    y = _sum_by_token(y_pairs, pairs.weight.to(math), pairs).to(out_dtype)
    return (y, h) if save_h else y


def _sum_by_token(rows: torch.Tensor, weight: torch.Tensor | None, pairs: _Pairs) -> torch.Tensor:
    """[T, H]: Σ over each token's pairs of weight · row (unweighted with weight=None), rows [S, H] in pair
    order; rows of dropped pairs must be zero."""
    T, K, H = pairs.num_tokens, pairs.top_k, rows.shape[1]
    if K is not None:
        if weight is None:
            return rows.view(T, K, H).sum(dim=1)
        return torch.bmm(weight.view(T, 1, K), rows.view(T, K, H)).squeeze(1)
    if T == 0:  # only unused slots, whose token 0 does not exist
        return rows.new_zeros((0, H))
    if weight is not None:
        rows = rows * weight.unsqueeze(1)
    return rows.new_zeros((T, H)).index_add_(0, pairs.tokens(), rows)


def moe_backward_cpu(
    spec: MoESpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    h: torch.Tensor,
    w3: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """(dx, dtopk_weights, dw1, dw2, db1, db2, dw3) of y = moe_forward_cpu(spec, x, …, w3=w3) given dy [T, H]
    and the forward's h (see the module docstring for the formulas).

    Each gradient has the dtype of its input and is contiguous in the logical layout of `moefuse.spec`
    ([E, N1, H] and [E, H, I] for the weights, whatever strides w1/w2 have; [E, I, H] for w1 and w3 with
    `MoESpec.w3`); db1/db2 are None without biases, dw3 None without w3. Dropped pairs (ids outside [0, E))
    contribute nothing and get a zero weight gradient. Deterministic: fixed summation orders, no atomics.
    """
    grads = _backward(spec, dy, x, _Pairs.from_top_k(topk_ids, topk_weights), w1, w2, b1, b2, h, w3)
    return (grads[0], grads[1].view(topk_ids.shape), *grads[2:])


def moe_pairs_backward_cpu(
    spec: MoESpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    pair_token: torch.Tensor,
    pair_expert: torch.Tensor,
    pair_weight: torch.Tensor,
    token_offsets: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    h: torch.Tensor,
    w3: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """`moe_backward_cpu` on flat pairs: (dx, dpair_weight [S_max], dw1, dw2, db1, db2, dw3) given dy and the h
    [S_max, N1] of `moe_pairs_forward_cpu`; unused slots get a zero weight gradient."""
    del token_offsets
    pairs = _Pairs.from_flat(pair_token, pair_expert, pair_weight, x.shape[0], spec.num_experts)
    return _backward(spec, dy, x, pairs, w1, w2, b1, b2, h, w3)


def _backward(spec: MoESpec, dy, x, pairs: _Pairs, w1, w2, b1, b2, h, w3=None):
    """The gradients of `_forward`, the weights' as [S] in pair order."""
    T, S = pairs.num_tokens, pairs.expert.numel()
    H, N1 = spec.hidden, spec.up_rows
    if tuple(h.shape) != (S, N1):
        raise ValueError(f"h: expected shape {(S, N1)} (pairs, up_rows), got {tuple(h.shape)}")
    if tuple(dy.shape) != (T, H):
        raise ValueError(f"dy: expected shape {(T, H)}, got {tuple(dy.shape)}")
    if _kernels.backward_unavailable(spec, x, w1, w2, w3) is None:
        dx, dw, dw1, dw2, db1, db2, dw3 = _kernels.backward(
            spec, dy, x, pairs.expert, pairs.weight, pairs.token, pairs.top_k or 0,
            w1, w2, b1, b2, h, w3)
        return (dx, dw.to(pairs.weight.dtype), dw1, dw2, db1.to(b1.dtype) if db1 is not None else None,
                db2.to(b2.dtype) if db2 is not None else None, dw3)
    return _torch_backward(spec, dy, x, pairs, w1, w2, b1, b2, h, w3)


def _torch_backward(spec: MoESpec, dy, x, pairs: _Pairs, w1, w2, b1, b2, h, w3=None):
    """The torch plan of `_backward` (module docstring), where the generated kernels cannot run."""
    T, S = pairs.num_tokens, pairs.expert.numel()
    E, H, N1 = spec.num_experts, spec.hidden, spec.up_rows
    math = _math_dtype(x.dtype)
    act = _activation(spec)
    act_grads = _activation_grads(spec.activation.expr, spec.activation.num_inputs)
    order, counts = sort_pairs(pairs.expert, E)
    weights, pair_token = pairs.weight, pairs.tokens()

    # Per pair (not per token) so that dx is summed over a token's pairs in a fixed order, like the kernels'
    # gather-sum.
    dx_pairs = torch.zeros((S, H), dtype=math, device=x.device)
    ds_pairs = torch.zeros(S, dtype=math, device=x.device)
    # With w3 the up-projection's gradient is two tensors, one per half of dH's columns (see the docstring).
    I = spec.intermediate  # noqa: E741
    dw1 = torch.zeros((E, N1 if w3 is None else I, H), dtype=math, device=x.device)
    dw3 = torch.zeros((E, I, H), dtype=math, device=x.device) if w3 is not None else None
    dw2 = torch.zeros((E, H, spec.intermediate), dtype=math, device=x.device)
    db1 = torch.zeros((E, N1), dtype=math, device=x.device) if b1 is not None else None
    db2 = torch.zeros((E, H), dtype=math, device=x.device) if b2 is not None else None
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start : start + c]
        tokens = pair_token[rows]
        dy_e = dy[tokens].to(math)  # [c, H]
        s = weights[rows].to(math).unsqueeze(-1)  # [c, 1]
        ins = [v.to(math) for v in expert_slices(h[start : start + c], spec)]
        start += c

        # ---- dA', A, dS: the router-weight gradient without Y ----
        a = act(*ins)  # [c, I]
        da = dy_e @ w2[e].to(math)  # dA' [c, I]
        ds = (da * a).sum(dim=-1)
        if b2 is not None:
            ds = ds + dy_e @ b2[e].to(math)
        ds_pairs[rows] = ds

        # ---- dH, into the up-projection rows each variable read ----
        da = da * s
        dh = torch.zeros((c, N1), dtype=math, device=x.device)
        for view, grad in zip(expert_slices(dh, spec), act_grads):
            view += da * grad(*ins)

        # ---- Weight and input gradients ----
        dw2[e] = dy_e.transpose(0, 1) @ (a * s)
        x_e = x[tokens].to(math)
        if w3 is None:
            dw1[e] = dh.transpose(0, 1) @ x_e
            dx_pairs[rows] = dh @ w1[e].to(math)
        else:
            dw1[e] = dh[:, :I].transpose(0, 1) @ x_e
            dw3[e] = dh[:, I:].transpose(0, 1) @ x_e
            dx_pairs[rows] = dh[:, :I] @ w1[e].to(math) + dh[:, I:] @ w3[e].to(math)
        if db1 is not None:
            db1[e] = dh.sum(dim=0)
        if db2 is not None:
            db2[e] = (dy_e * s).sum(dim=0)

    dx = _sum_by_token(dx_pairs, None, pairs)
    return (
        dx.to(x.dtype),
        ds_pairs.to(weights.dtype),
        dw1.to(w1.dtype),
        dw2.to(w2.dtype),
        db1.to(b1.dtype) if db1 is not None else None,
        db2.to(b2.dtype) if db2 is not None else None,
        dw3.to(w3.dtype) if dw3 is not None else None,
    )
