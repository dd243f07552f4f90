"""Routing metadata on the device: which expert-sorted row each (token, slot) pair lands in.

A pair is p = t·K + k, one (token, slot) of `topk_ids` [T, K]; S = T·K. The plan sorts the pairs by expert,
stably (within an expert, pairs keep increasing p), so the grouped GEMMs see each expert's rows as one
contiguous segment:

  counts       [E]    int32  pairs routed to each expert
  offsets      [E+1]  int32  exclusive prefix sum of counts; offsets[E] is the number of kept pairs
  sorted_pairs [S]    int32  the pair of each sorted row (the GEMM gather index: token = pair // K)
  pair_pos     [S]    int32  the sorted row of each pair (the inverse; the combine's scatter index)

Flat pairs (token rounding gives tokens a variable number of experts; see `moefuse.runtime.pairs`) are the
same plan over `pair_expert` [S_max] viewed as a [S_max, 1] top-k (K = 1, pair p = its slot), plus the two
tensors that say whose pairs they are: `pair_token` [S_max] (a GEMM gathers x row pair_token[p] instead of
p // K) and `token_offsets` [T+1] (the combine sums pairs token_offsets[t] .. token_offsets[t+1]). Unused slots
(expert −1) are dropped pairs like any other.

Ids outside [0, E) are *dropped*: they count for no expert, they sort after every kept pair (rows
offsets[E] .. S-1, still stable), no GEMM computes their rows, and the combine gives them weight 0. The common
use is `-1` for "no expert" (expert parallelism, padding); it also keeps a corrupt id from writing out of
bounds.

Three launches, no host sync (the plan can be captured in a CUDA graph), deterministic (integer counts, no
atomics):
  1. histogram: each block of BLOCK_S pairs counts its pairs per bucket (bucket E = dropped) → hist [NB, E+1]
  2. scan:      per bucket, an exclusive prefix sum over blocks → block_start [NB, E+1], and totals [E+1]
  3. scatter:   each pair's row = offset of its bucket + block_start + its rank among its block's pairs
                of the same bucket (a one-hot cumsum, which is what makes the order stable)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity, never elementwise by accident
class RoutingPlan:
    """Where every (token, slot) pair sits in expert-sorted order. See the module docstring for the layout."""

    counts: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [E + 1] int32
    sorted_pairs: torch.Tensor  # [S] int32
    pair_pos: torch.Tensor  # [S] int32
    num_experts: int
    top_k: int
    # Flat pairs only (top_k = 1): the token of each pair, and each token's pairs. None for a [T, K] top-k.
    pair_token: torch.Tensor | None = None  # [S] int32 or int64
    token_offsets: torch.Tensor | None = None  # [T + 1] int32 or int64

    @property
    def num_pairs(self) -> int:
        return self.sorted_pairs.numel()

    @property
    def flat_pairs(self) -> bool:
        return self.pair_token is not None

    @property
    def num_tokens(self) -> int:
        return self.token_offsets.numel() - 1 if self.flat_pairs else self.num_pairs // max(self.top_k, 1)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _bucket_of(ids, E):
    # Ids outside [0, E) go to the extra bucket E, which sorts last and which no GEMM reads.
    return tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)


@triton.jit
def routing_histogram_kernel(
    # Pointers
    topk_ids_ptr,  # [T, K] int32 or int64, any strides
    hist_ptr,  # [NB, E + 1] int32, out: pairs of block b in each bucket
    # Sizes
    S, E, TOP_K,
    # Strides
    stride_it, stride_ik,
    # Meta-parameters
    BLOCK_S: tl.constexpr,  # pairs per block
    BLOCK_E: tl.constexpr,  # power of two >= E + 1
):
    """Grid: (NB,) with NB = cdiv(S, BLOCK_S). Program b owns pairs [b·BLOCK_S, (b+1)·BLOCK_S) and row b of
    hist."""
    block = tl.program_id(0)
    pairs = block * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = pairs < S
    ids = tl.load(topk_ids_ptr + (pairs // TOP_K) * stride_it + (pairs % TOP_K) * stride_ik, mask=in_range)
    # -1 matches no column: pairs past S count nowhere.
    bucket = tl.where(in_range, _bucket_of(ids, E), -1)

    columns = tl.arange(0, BLOCK_E)
    one_hot = (bucket[:, None] == columns[None, :]).to(tl.int32)
    tl.store(hist_ptr + block * (E + 1) + columns, tl.sum(one_hot, axis=0), mask=columns < E + 1)


@triton.jit
def routing_scan_kernel(
    # Pointers
    hist_ptr,  # [NB, E + 1] int32
    block_start_ptr,  # [NB, E + 1] int32, out: pairs of the same bucket in blocks before b
    totals_ptr,  # [E + 1] int32, out: pairs per bucket (the first E are the plan's counts)
    # Sizes
    NB, E,
    # Meta-parameters
    BLOCK_B: tl.constexpr,  # blocks scanned per step
    BLOCK_C: tl.constexpr,  # buckets per program
):
    """Grid: (cdiv(E + 1, BLOCK_C),). Program c owns buckets [c·BLOCK_C, (c+1)·BLOCK_C): it walks all NB
    blocks in order, so the prefix is exact and the result does not depend on scheduling."""
    buckets = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    bucket_mask = buckets < E + 1
    running = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        mask = (blocks < NB)[:, None] & bucket_mask[None, :]
        offs = blocks[:, None] * (E + 1) + buckets[None, :]
        h = tl.load(hist_ptr + offs, mask=mask, other=0)
        tl.store(block_start_ptr + offs, running[None, :] + tl.cumsum(h, axis=0) - h, mask=mask)
        running += tl.sum(h, axis=0)
    tl.store(totals_ptr + buckets, running, mask=bucket_mask)


@triton.jit
def routing_scatter_kernel(
    # Pointers
    topk_ids_ptr,  # [T, K] int32 or int64, any strides
    block_start_ptr,  # [NB, E + 1] int32
    totals_ptr,  # [E + 1] int32
    offsets_ptr,  # [E + 1] int32, out (written by program 0)
    sorted_pairs_ptr,  # [S] int32, out
    pair_pos_ptr,  # [S] int32, out
    # Sizes
    S, E, TOP_K,
    # Strides
    stride_it, stride_ik,
    # Meta-parameters
    BLOCK_S: tl.constexpr,  # pairs per block, as in the histogram
    BLOCK_E: tl.constexpr,  # power of two >= E + 1
):
    """Grid: (NB,). Program b owns the same pairs as in the histogram and writes their sorted rows; every
    program rebuilds the E+1 bucket offsets from the totals (cheaper than a fourth launch)."""
    block = tl.program_id(0)
    columns = tl.arange(0, BLOCK_E)
    column_mask = columns < E + 1

    # ---- Bucket offsets: exclusive prefix sum of the totals; offsets[E] = number of kept pairs ----
    totals = tl.load(totals_ptr + columns, mask=column_mask, other=0)
    bucket_offset = tl.cumsum(totals, axis=0) - totals
    if block == 0:
        tl.store(offsets_ptr + columns, bucket_offset, mask=column_mask)

    # ---- Rank of each pair among the earlier pairs of its bucket in this block ----
    pairs = block * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = pairs < S
    ids = tl.load(topk_ids_ptr + (pairs // TOP_K) * stride_it + (pairs % TOP_K) * stride_ik, mask=in_range)
    bucket = tl.where(in_range, _bucket_of(ids, E), -1)
    one_hot = (bucket[:, None] == columns[None, :]).to(tl.int32)
    rank = tl.sum(one_hot * tl.cumsum(one_hot, axis=0), axis=1) - 1

    # ---- Sorted row = bucket offset + pairs of the bucket in earlier blocks + rank ----
    start = tl.load(block_start_ptr + block * (E + 1) + columns, mask=column_mask, other=0)
    base = tl.sum(one_hot * (bucket_offset + start)[None, :], axis=1)
    pos = base + rank
    tl.store(pair_pos_ptr + pairs, pos, mask=in_range)
    tl.store(sorted_pairs_ptr + pos, pairs, mask=in_range)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingMeta:
    """Block sizes of the three routing launches; a function of E only, so a new T never recompiles."""

    block_s: int
    block_e: int
    block_b: int
    block_c: int

    @classmethod
    def for_experts(cls, num_experts: int) -> RoutingMeta:
        block_e = triton.next_power_of_2(num_experts + 1)
        # The one-hot tile is BLOCK_S × BLOCK_E int32: keep it near 8K elements (64 registers a thread at
        # 4 warps) so it does not spill, but never below 16 pairs a block.
        block_s = max(16, 8192 // block_e)
        block_c = min(block_e, 64)
        block_b = max(1, 4096 // block_c)
        return cls(block_s, block_e, block_b, block_c)


def routing_plan(topk_ids: torch.Tensor, num_experts: int) -> RoutingPlan:
    """The expert-sorted layout of the pairs of `topk_ids` [T, K], computed on topk_ids' device, no host sync."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected a 2-D tensor [T, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids: expected dtype int32 or int64, got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    T, K = topk_ids.shape
    S, E = T * K, num_experts
    if S >= 2**31:
        raise ValueError(f"topk_ids: T·K = {S} pairs do not fit the int32 plan (limit 2**31 - 1)")
    device = topk_ids.device
    meta = RoutingMeta.for_experts(E)
    nb = triton.cdiv(S, meta.block_s)

    totals = torch.empty(E + 1, dtype=torch.int32, device=device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(S, dtype=torch.int32, device=device)
    pair_pos = torch.empty(S, dtype=torch.int32, device=device)
    if S == 0:
        totals.zero_()
        offsets.zero_()
    else:
        hist = torch.empty(nb, E + 1, dtype=torch.int32, device=device)
        block_start = torch.empty_like(hist)
        routing_histogram_kernel[(nb,)](
            topk_ids, hist, S, E, K, topk_ids.stride(0), topk_ids.stride(1),
            BLOCK_S=meta.block_s, BLOCK_E=meta.block_e, num_warps=NUM_WARPS,
        )
        routing_scan_kernel[(triton.cdiv(E + 1, meta.block_c),)](
            hist, block_start, totals, nb, E,
            BLOCK_B=meta.block_b, BLOCK_C=meta.block_c, num_warps=NUM_WARPS,
        )
        routing_scatter_kernel[(nb,)](
            topk_ids, block_start, totals, offsets, sorted_pairs, pair_pos, S, E, K,
            topk_ids.stride(0), topk_ids.stride(1),
            BLOCK_S=meta.block_s, BLOCK_E=meta.block_e, num_warps=NUM_WARPS,
        )
    return RoutingPlan(totals[:E], offsets, sorted_pairs, pair_pos, num_experts=E, top_k=K)


def flat_pairs_plan(
    pair_token: torch.Tensor, pair_expert: torch.Tensor, token_offsets: torch.Tensor, num_experts: int
) -> RoutingPlan:
    """The expert-sorted layout of flat pairs (`pair_expert` [S], −1 in unused slots), as `routing_plan` of
    pair_expert viewed [S, 1]; no host sync. Within an expert, pairs keep their (token-major) order."""
    for name, t in (("pair_token", pair_token), ("pair_expert", pair_expert), ("token_offsets", token_offsets)):
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected dtype int32 or int64, got {t.dtype}")
    if pair_token.shape != pair_expert.shape:
        raise ValueError(f"pair_token {tuple(pair_token.shape)} and pair_expert {tuple(pair_expert.shape)}: "
                         f"expected one shape [S_max]")
    if token_offsets.numel() < 1:
        raise ValueError("token_offsets: expected T + 1 >= 1 entries, got an empty tensor")
    plan = routing_plan(pair_expert.unsqueeze(1), num_experts)
    return dataclasses.replace(plan, pair_token=pair_token, token_offsets=token_offsets)


def routing_plan_reference(topk_ids: torch.Tensor, num_experts: int) -> RoutingPlan:
    """The same plan in plain PyTorch (stable argsort + bincount): the tests' oracle and the CPU path."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected a 2-D tensor [T, K], got shape {tuple(topk_ids.shape)}")
    T, K = topk_ids.shape
    E = num_experts
    ids = topk_ids.reshape(-1).long()
    bucket = torch.where((ids >= 0) & (ids < E), ids, E)
    sorted_pairs = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=E + 1)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    pair_pos = torch.empty_like(sorted_pairs)
    pair_pos[sorted_pairs] = torch.arange(ids.numel(), device=ids.device)
    i32 = torch.int32
    return RoutingPlan(counts.to(i32), offsets.to(i32), sorted_pairs.to(i32), pair_pos.to(i32), E, K)
