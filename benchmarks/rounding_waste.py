"""Wasted GEMM tile rows with and without token rounding (issue #5): a count, no timing.

    python benchmarks/rounding_waste.py            # ~20 s on one core; prints a markdown table

A grouped GEMM over expert-sorted rows computes whole tiles of M rows; an expert with f rows fills ⌈f/M⌉
tiles, the last one partly. "Wasted rows" are the rows computed in partial tiles that hold no pair:
Σ_e ⌈f_e/M⌉·M − Σ_e f_e. Schemes:

- vLLM-style padding (`moe_align_block_size`): each expert's rows padded to a multiple of M in memory; the
  padded index entries are materialised (and a T·K + E·(M−1) buffer allocated), the GEMM computes them.
- masked varlen tiles (moefuse's exact path): no padding in memory; the partial last tile is computed with
  its missing rows masked — the same tile rows as vLLM, none materialised.
- token rounding up / down / nearest (`moefuse.rounding.round_routing`): counts become multiples of M, so no
  partial tile is left (except an expert capped at T tokens); the routing changes instead: "Δ pairs" is the
  number of (token, expert) pairs added (+) or dropped (−) against top-K.

Routing: uniform (every expert equally likely), Zipf-skewed (expert popularity ∝ 1/rank^1.2), both drawn as
top-K of Gumbel-perturbed log-popularities (scores = their softmax), and a real router: the layer-0 router of a
tiny Qwen3-MoE (`moefuse.testing.tiny_model`, random weights, E=64, K=8) on random token ids.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moefuse.rounding import round_routing  # noqa: E402

E, K = 64, 8
TOKENS = (256, 4096)
TILES = (64, 128)
MODES = ("up", "down", "nearest")


def synthetic(T: int, zipf: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [T, E], topk_ids, topk_weights): top-K of log-popularity + Gumbel noise (a draw of K distinct
    experts ∝ popularity), weights = top-K scores renormalised."""
    popularity = torch.arange(1, E + 1, dtype=torch.float64) ** -zipf
    popularity = popularity[torch.randperm(E, generator=gen)]
    gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=gen, dtype=torch.float64)))
    scores = torch.softmax(popularity.log() + gumbel, -1).float()
    top, ids = scores.topk(K, -1)
    return scores, ids, top / top.sum(-1, keepdim=True)


def real_router(T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer-0 router of a tiny Qwen3-MoE (E=64, K=8) on T random tokens (sequences of 128)."""
    from moefuse.testing import tiny_model

    model = tiny_model("qwen3_moe", num_experts=E, num_experts_per_tok=K)
    seen = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    ids = torch.randint(0, 128, (T // 128, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    handle.remove()
    logits, weights, topk_ids = seen[0]
    return torch.softmax(logits.float(), -1), topk_ids, weights


def tiles_of(counts: torch.Tensor, m: int) -> tuple[int, int]:
    """(tiles, rows computed) of a varlen grouped GEMM over per-expert row counts."""
    tiles = int(((counts + m - 1) // m).sum())
    return tiles, tiles * m


def measure(scores, ids, weights, m: int) -> dict[str, str]:
    T = ids.shape[0]
    exact = torch.bincount(ids.flatten(), minlength=E)
    tiles, computed = tiles_of(exact, m)
    wasted = computed - T * K
    row = {"exact waste": f"{wasted} ({100 * wasted / computed:.1f} %)", "exact tiles": str(tiles),
           "vLLM padded entries": f"{wasted} (buffer {T * K + E * (m - 1)})"}
    for mode in MODES:
        pairs = round_routing(scores, ids, weights, mode, m)
        n = int(pairs.token_offsets[-1])
        counts = torch.bincount(pairs.expert[:n].long(), minlength=E)
        r_tiles, r_computed = tiles_of(counts, m)
        row[mode] = f"{r_computed - n} / {n - T * K:+d} ({100 * (n - T * K) / (T * K):+.1f} %)"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    header = ["routing", "T", "M", "T·K pairs", "tiles (exact)", "wasted rows, vLLM padding = masked varlen",
              "vLLM padded index entries", "up: wasted / Δ pairs", "down: wasted / Δ pairs",
              "nearest: wasted / Δ pairs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ("uniform", "Zipf 1.2", "real router (tiny Qwen3-MoE)"):
        for T in TOKENS:
            if name == "uniform":
                routing = synthetic(T, 0.0, gen)
            elif name.startswith("Zipf"):
                routing = synthetic(T, 1.2, gen)
            else:
                routing = real_router(T)
            for m in TILES:
                r = measure(*routing, m)
                lines.append(f"| {name} | {T} | {m} | {T * K} | {r['exact tiles']} | {r['exact waste']} | "
                             f"{r['vLLM padded entries']} | {r['up']} | {r['down']} | {r['nearest']} |")
    print(f"E={E}, K={K}; wasted rows = rows computed in partial tiles; Δ pairs against top-K "
          f"({time.perf_counter() - start:.0f} s)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
