"""Token rounding (SonicMoE): round every expert's token count to a multiple of the GEMM tile M.

    pairs = round_routing(scores, topk_ids, topk_weights, mode="nearest", tile_m=128)   # a FlatPairs

A grouped GEMM over expert-sorted rows computes whole tiles of M rows; an expert with f tokens fills
⌈f/M⌉ tiles, the last one partly. Rounding changes the routing so that every count is a multiple of M and
no tile is partly empty. It changes what the model computes: it is meant for training (SonicMoE trains with
it and evaluates with exact top-K), and the compile report marks every layer lowered with it.

Per expert e with f_e tokens selected by top-K (M = tile_m, T tokens):

- target_e: ``"up"`` ⌈f/M⌉·M, ``"down"`` ⌊f/M⌋·M, ``"nearest"`` the nearest multiple, a tie (f = (j+½)·M)
  rounded **up**; every target capped at T (an expert cannot hold a token twice). Ties go up because a tie
  costs M/2 rows either way, and rounding up keeps every pair top-K chose (it adds M/2 pairs of small router
  weight) where rounding down would drop M/2 chosen pairs; the rule is also the same for every expert
  (round-half-to-even, SonicMoE's choice, goes up or down with the parity of f/M, for no gain per expert).
- ranking of the T tokens in column e: first the tokens that selected e, by their routing weight
  (topk_weights, descending), then all others, by their score (scores[:, e], descending); equal keys keep
  token order (lower token first). The first target_e tokens are kept.

So ``down`` drops an expert's lowest-weighted selected tokens (an expert with fewer than M disappears),
``up`` adds the highest-scoring tokens that did not select it; counts change by less than M. A token can end
with fewer or more than K experts, or none: its output is then zero.

Weights of the kept pairs, exactly: a pair top-K selected keeps its routing weight ``topk_weights[t, k]``
(as the router produced it: renormalised, scaled, whatever the model does); a pair rounding added gets
``scores[t, e]`` cast to topk_weights' dtype — the value top-k ranked, e.g. the softmax probability over all
E experts for Qwen3-MoE / Mixtral / OLMoE (not renormalised over the token's new expert set). Both stay in
the autograd graph: gradients flow to topk_weights for kept selected pairs and to scores for added pairs
(dropped pairs get none).

``"off"`` returns exact top-K as flat pairs. Everything runs as tensor ops on the device with no host sync:
a per-column rank from two stable sorts, a dense keep[T, E] mask, and a cumsum compaction into buffers of
the upper bound S_max = T·K + E·(M−1) (Σ target_e ≤ Σ f_e + E·(M−1)); the true count is token_offsets[T].
"""
from __future__ import annotations

from typing import Literal

import torch

from moefuse.errors import OptionsError
from moefuse.runtime.pairs import FlatPairs

Mode = Literal["off", "up", "down", "nearest"]
MODES: tuple[str, ...] = ("off", "up", "down", "nearest")


def check_tile_m(tile_m: int) -> int:
    """tile_m must be a power of two ≥ 16 (the GEMM tile heights the kernels use). Returns it."""
    if isinstance(tile_m, bool) or not isinstance(tile_m, int) or tile_m < 16 or tile_m & (tile_m - 1):
        raise OptionsError(f"tile_m must be a power of two ≥ 16 (e.g. 64 or 128), got {tile_m!r}")
    return tile_m


def max_pairs(num_tokens: int, top_k: int, num_experts: int, tile_m: int) -> int:
    """S_max = T·K + E·(M−1): no rounding mode keeps more pairs (each expert gains at most M−1)."""
    return num_tokens * top_k + num_experts * (tile_m - 1)


def exact_pairs(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> FlatPairs:
    """Exact top-K as flat pairs (T·K of them, all used): token t's pairs are its K top-k entries in order."""
    T, K = topk_ids.shape
    dev = topk_ids.device
    return FlatPairs(
        token=torch.arange(T * K, device=dev, dtype=torch.int32) // K,
        expert=topk_ids.reshape(-1).to(torch.int32),
        weight=topk_weights.reshape(-1),
        token_offsets=torch.arange(T + 1, device=dev, dtype=torch.int32) * K,
    )


def rounded_counts(counts: torch.Tensor, mode: str, tile_m: int, num_tokens: int) -> torch.Tensor:
    """Per-expert target counts [E] (int64) for per-expert selected counts [E]; see the module docstring."""
    M = tile_m
    if mode == "up":
        target = (counts + (M - 1)) // M * M
    elif mode == "down":
        target = counts // M * M
    elif mode == "nearest":
        target = (counts + M // 2) // M * M  # ties (f = (j+½)·M) round up; M is even
    else:
        raise OptionsError(f"token_rounding mode must be one of {list(MODES[1:])} here, got {mode!r}")
    return target.clamp_max(num_tokens)


def round_routing(scores: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: str = "nearest",
                  tile_m: int = 128) -> FlatPairs:
    """Round each expert's token count to a multiple of `tile_m` (module docstring: semantics and weights).

    scores [T, E] float: the router's score matrix top-k was taken over (e.g. softmax probabilities);
    topk_ids [T, K] int: the selected experts (distinct per token); topk_weights [T, K] float: their weights.
    Returns `FlatPairs` in buffers of S_max = T·K + E·(M−1) pairs (T·K for mode "off"), token-major and, within
    a token, by expert id; weights in topk_weights' dtype. No host sync.
    """
    if mode not in MODES:
        raise OptionsError(f"token_rounding must be one of {list(MODES)}, got {mode!r}")
    if mode == "off":
        return exact_pairs(topk_ids, topk_weights)
    check_tile_m(tile_m)
    T, K = topk_ids.shape
    E = scores.shape[-1]
    dev = scores.device
    ids = topk_ids.long()
    sel = torch.zeros((T, E), dtype=torch.bool, device=dev).scatter(1, ids, True)
    w_sel = torch.zeros((T, E), dtype=topk_weights.dtype, device=dev).scatter(1, ids, topk_weights)
    # Each kept pair's weight: its routing weight if top-K chose it, else its score (autograd keeps both paths).
    weight = torch.where(sel, w_sel, scores.to(topk_weights.dtype))

    # Rank the tokens of every column: selected first (by weight), then the rest (by score), ties by token.
    # Two stable sorts: by key descending, then by group (selected = 0) — the second keeps the first's order.
    key_dtype = torch.promote_types(torch.promote_types(scores.dtype, topk_weights.dtype), torch.float32)
    key = torch.where(sel, w_sel.detach().to(key_dtype), scores.detach().to(key_dtype))
    by_key = torch.sort(key, dim=0, descending=True, stable=True).indices
    group = (~sel).to(torch.int32).gather(0, by_key)
    order = by_key.gather(0, torch.sort(group, dim=0, stable=True).indices)  # order[r, e]: token of rank r
    positions = torch.arange(T, device=dev).unsqueeze(1).expand(T, E)
    rank = torch.empty_like(order).scatter_(0, order, positions)  # rank[t, e]: rank of token t in column e
    target = rounded_counts(sel.sum(0), mode, tile_m, T)
    keep = rank < target  # [T, E]

    # Compaction, token-major: slot of each kept (t, e) is the number of kept pairs before it in row-major
    # order; dropped ones go to a dump slot past the end that is cut off.
    s_max = max_pairs(T, K, E, tile_m)
    flat_keep = keep.reshape(-1)
    dest = torch.where(flat_keep, torch.cumsum(flat_keep, 0) - 1, s_max)
    flat = torch.arange(T * E, device=dev)
    token = torch.zeros(s_max + 1, dtype=torch.int32, device=dev).scatter_(0, dest, (flat // E).to(torch.int32))
    expert = torch.full((s_max + 1,), -1, dtype=torch.int32, device=dev).scatter_(0, dest, (flat % E).to(torch.int32))
    # scatter_add, not scatter: every used slot has one writer, and the dump slot only collects zeros.
    kept_weight = torch.where(flat_keep, weight.reshape(-1), 0)
    pair_weight = torch.zeros(s_max + 1, dtype=weight.dtype, device=dev).scatter_add(0, dest, kept_weight)
    offsets = torch.cat([keep.new_zeros(1, dtype=torch.int64), torch.cumsum(keep.sum(1), 0)]).to(torch.int32)
    # Unused slots repeat the last used token, so pair_token is non-decreasing and in range everywhere.
    token = torch.cummax(token[:s_max], 0).values
    return FlatPairs(token, expert[:s_max], pair_weight[:s_max], offsets)
