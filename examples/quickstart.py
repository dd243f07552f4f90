"""moefuse quickstart: a small Qwen3-MoE (random weights, no download), compiled with backend="moefuse".

Prints what was lowered (one line per MoE layer, with the kernels that run it), the largest difference from
eager, and eager vs compiled time on this machine.

    python examples/quickstart.py [--family qwen3_moe|mixtral|olmoe] [--dtype float32|float16|bfloat16]
                                  [--inner inductor|eager] [--tokens 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import moefuse
from moefuse.testing import FAMILIES, num_moe_layers, tiny_model


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILIES))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--tokens", type=int, default=256, help="tokens per forward (batch 2 × tokens/2)")
    p.add_argument("--reps", type=int, default=30, help="timed forwards per path (median reported)")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    # Larger than the test models so the timing means something, still seconds on a laptop CPU.
    model = tiny_model(args.family, dtype, hidden_size=256, num_attention_heads=8, head_dim=32,
                       **({"moe_intermediate_size": 128, "num_experts": 16} if args.family == "qwen3_moe" else
                          {"intermediate_size": 128, "num_local_experts": 16} if args.family == "mixtral" else
                          {"intermediate_size": 128, "num_experts": 16}))
    input_ids = torch.randint(0, model.config.vocab_size, (2, args.tokens // 2), generator=torch.Generator().manual_seed(0))
    print(f"model: tiny {args.family}, {num_moe_layers(model)} MoE layers, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.tokens} tokens")

    backend = moefuse.Backend({"inner": args.inner})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(input_ids).logits
        print(f"compile + first call: {time.perf_counter() - t0:.1f} s (inner compiler: {args.inner})\n")
        ref = model(input_ids).logits
        print(backend.explanation)
        err = (out.float() - ref.float()).abs().max().item()
        rel = err / ref.float().abs().max().item()
        print(f"\nmax |compiled - eager| = {err:.3e} (relative {rel:.2e})")
        eager_ms = median_ms(lambda: model(input_ids), args.reps)
        compiled_ms = median_ms(lambda: compiled(input_ids), args.reps)
    print(f"eager {eager_ms:.2f} ms, moefuse {compiled_ms:.2f} ms per forward "
          f"(median of {args.reps}; ratio {eager_ms / compiled_ms:.2f}×)")
    lowered = len(backend.explanation.lowered)
    if lowered != num_moe_layers(model):
        raise SystemExit(f"expected {num_moe_layers(model)} lowered MoE layers, got {lowered}")


if __name__ == "__main__":
    main()
