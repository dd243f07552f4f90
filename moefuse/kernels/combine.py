"""The weighted combine: out[t] = Σ_k topk_w[t, k] · Y[pair_pos[t·K + k]], in fp32, without atomics.

With WEIGHTED=False it is the backward's unweighted gather-sum dx[t] = Σ_k dX[pair_pos[t·K + k]] (the routing
weights were already applied to dH), the same kernel with the weight loads compiled away.

Y holds the down-projection's rows in expert-sorted order. Each output element is written by exactly one
program, which sums its K terms in slot order k = 0 .. K-1: the result is bit-for-bit reproducible.

With FLAT_PAIRS (`routing.flat_pairs_plan`) token t sums its pairs p = token_offsets[t] .. token_offsets[t+1] - 1
in order, the weight of pair p at row p of topk_w [S, 1]: a loop bounded at run time by the offsets on the
device (no host sync); for the exact top-K as flat pairs it is the same sum in the same order. (SonicMoE
measured that fusing this scatter into the down-projection epilogue is slower on Hopper; it stays separate.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moefuse.kernels.routing import RoutingPlan

NUM_WARPS = 4


@triton.jit
def combine_kernel(
    # Pointers
    y_ptr,  # [S, H] expert outputs in expert-sorted order, any float dtype, any strides
    topk_w_ptr,  # [T, K] ([S, 1] if FLAT_PAIRS) routing weights, any float dtype, any strides; read only if WEIGHTED
    pair_pos_ptr,  # [S] int32, sorted row of pair t·K + k (of pair p if FLAT_PAIRS)
    offsets_ptr,  # [E + 1] int32; rows >= offsets[E] hold dropped pairs and were never written
    token_offsets_ptr,  # [T + 1] int32/int64, pairs of each token; read only if FLAT_PAIRS
    out_ptr,  # [T, H] out, any float dtype
    # Sizes
    H, E, TOP_K,
    # Strides
    stride_ym, stride_yh,
    stride_wt, stride_wk,
    stride_ot, stride_oh,
    # Meta-parameters
    WEIGHTED: tl.constexpr,
    FLAT_PAIRS: tl.constexpr,  # topk_w is [S, 1]; token t owns pairs token_offsets[t] .. token_offsets[t+1]
    BLOCK_H: tl.constexpr,
):
    """Grid: (T, cdiv(H, BLOCK_H)). Program (t, j) owns out[t, j·BLOCK_H : (j+1)·BLOCK_H]."""
    token = tl.program_id(0).to(tl.int64)  # T·H can pass 2**31
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = rh < H
    kept_rows = tl.load(offsets_ptr + E)

    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # A dropped pair's row holds garbage (possibly NaN): mask the load, not just the weight.
    if FLAT_PAIRS:
        first = tl.load(token_offsets_ptr + token).to(tl.int64)  # int64: p·stride_wt
        last = tl.load(token_offsets_ptr + token + 1).to(tl.int64)
        for p in range(first, last):
            pos = tl.load(pair_pos_ptr + p)
            kept = pos < kept_rows
            row = tl.load(y_ptr + pos.to(tl.int64) * stride_ym + rh * stride_yh, mask=h_mask & kept, other=0.0)
            if WEIGHTED:
                weight = tl.where(kept, tl.load(topk_w_ptr + p * stride_wt).to(tl.float32), 0.0)
                acc += weight * row.to(tl.float32)
            else:
                acc += row.to(tl.float32)
    else:
        for k in range(0, TOP_K):
            pos = tl.load(pair_pos_ptr + token * TOP_K + k)
            kept = pos < kept_rows
            row = tl.load(y_ptr + pos.to(tl.int64) * stride_ym + rh * stride_yh, mask=h_mask & kept, other=0.0)
            if WEIGHTED:
                weight = tl.where(kept, tl.load(topk_w_ptr + token * stride_wt + k * stride_wk).to(tl.float32), 0.0)
                acc += weight * row.to(tl.float32)
            else:
                acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + rh * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


def combine_block_h(hidden: int) -> int:
    """BLOCK_H: the whole row up to 1024 columns (one program a token), else 1024-column slices."""
    return min(1024, triton.next_power_of_2(max(hidden, 16)))


def combine(
    y: torch.Tensor, topk_w: torch.Tensor | None, plan: RoutingPlan, *, out_dtype: torch.dtype
) -> torch.Tensor:
    """out [T, H] in out_dtype from the sorted expert outputs y [S, H] and the routing weights topk_w [T, K]
    ([S, 1] for flat pairs, T = token_offsets.numel() - 1); topk_w=None sums the rows of each token unweighted
    (the backward's dx)."""
    # ---- Check ----
    S, K = plan.num_pairs, plan.top_k
    if y.dim() != 2 or y.shape[0] != S:
        raise ValueError(f"y: expected shape [{S}, H], got {tuple(y.shape)}")
    T = plan.num_tokens
    expected_w = (S, 1) if plan.flat_pairs else (T, K)
    if topk_w is not None and tuple(topk_w.shape) != expected_w:
        raise ValueError(f"topk_w: expected shape {expected_w}, got {tuple(topk_w.shape)}")
    H = y.shape[1]

    # ---- Allocate ----
    out = torch.empty(T, H, dtype=out_dtype, device=y.device)
    if T == 0 or H == 0:
        return out

    # ---- Launch ----
    block_h = combine_block_h(H)
    w_arg, w_strides = (topk_w, topk_w.stride()) if topk_w is not None else (y, (0, 0))  # y: never read
    combine_kernel[(T, triton.cdiv(H, block_h))](
        y, w_arg, plan.pair_pos, plan.offsets, plan.token_offsets if plan.flat_pairs else plan.offsets, out,
        H, plan.num_experts, K,
        y.stride(0), y.stride(1), *w_strides, out.stride(0), out.stride(1),
        WEIGHTED=topk_w is not None, FLAT_PAIRS=plan.flat_pairs, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )
    return out
