"""Does token rounding hurt training? A tiny MoE LM trained with exact top-K and with each rounding mode.

    python benchmarks/rounding_quality.py            # ≤ 5 min on one core (--steps 200 by default)
    python benchmarks/rounding_quality.py --steps 40 # a smoke run

The model: a tiny Qwen3-MoE (`moefuse.testing.tiny_config`: 2 layers, H=64, E=8 experts of I=32, top-2,
vocabulary 128), random init from the same seed for every run. The task: sequences of 64 tokens drawn from
one of 8 random sparse Markov chains over the vocabulary (each token has 4 possible successors), the chain
picked per sequence — learning it means recognising the chain from the context, so the experts have
something to specialise on. Every run sees the same batches (16 × 64 = 1024 tokens a step, 128 per expert
on average) and trains with AdamW (lr 3e-3) through `torch.compile(backend=moefuse.Backend({"inner": "eager",
"token_rounding": mode, "tile_m": M}))`, M = 64 by default, on moefuse's CPU path; "exact" is
token_rounding="off". The run checks each compiled model lowered both MoE layers (with rounding where asked)
and that the fused ops ran.

Reported per run: the training loss (mean of the last 20 steps, on the routing it trained with) and the
held-out loss of the trained model with exact top-K (plain transformers, no moefuse: SonicMoE trains with
rounding and evaluates with top-K), against the exact run. The entropy rate of the task is the floor.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.pop("TRITON_INTERPRET", None)  # moefuse's CPU path, not the Triton interpreter

from moefuse import Backend  # noqa: E402
from moefuse.runtime import op as moe_op  # noqa: E402
from moefuse.testing import tiny_config  # noqa: E402

VOCAB, CHAINS, FANOUT, SEQ, BATCH = 128, 8, 4, 64, 16


def make_task(seed: int = 0):
    """Transition tables [CHAINS, VOCAB, VOCAB] of sparse random Markov chains, and the task's entropy rate
    in nats per token (given the chain; the model must also infer the chain, so this is a floor)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(CHAINS, VOCAB, VOCAB)
    for c in range(CHAINS):
        nxt = torch.rand(VOCAB, VOCAB, generator=g).argsort(-1)[:, :FANOUT]
        w = torch.rand(VOCAB, FANOUT, generator=g) + 0.2
        probs[c].scatter_(1, nxt, w / w.sum(-1, keepdim=True))
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
    return probs, entropy


def batch(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    chain = torch.randint(0, CHAINS, (BATCH,), generator=g)
    tok = torch.randint(0, VOCAB, (BATCH,), generator=g)
    out = [tok]
    for _ in range(SEQ - 1):
        tok = torch.multinomial(probs[chain, tok], 1, generator=g).squeeze(1)
        out.append(tok)
    return torch.stack(out, 1)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(mode: str, steps: int, tile_m: int, train_batches, eval_batches) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    backend = Backend({"inner": "eager", "token_rounding": mode, "tile_m": tile_m})
    compiled = torch.compile(model, backend=backend)
    before = dict(moe_op.counters)
    losses, start = [], time.perf_counter()
    for ids in train_batches[:steps]:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(compiled, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    lowered = backend.explanation.lowered
    ran = sum(moe_op.counters[k] - before[k] for k in moe_op.counters if "fwd_train" in k)
    assert len(lowered) >= 2 and all(lw.rounding == mode for lw in lowered), str(backend.explanation)
    assert ran == 2 * steps, f"fused training op ran {ran} times in {steps} steps"
    model.eval()
    with torch.no_grad():
        eval_loss = sum(lm_loss(model, ids).item() for ids in eval_batches) / len(eval_batches)
    return {"train": sum(losses[-20:]) / len(losses[-20:]), "eval": eval_loss, "first": losses[0],
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tile-m", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probs, entropy = make_task()
    g = torch.Generator().manual_seed(1)
    train_batches = [batch(probs, g) for _ in range(args.steps)]
    eval_batches = [batch(probs, g) for _ in range(8)]
    results = {}
    for mode in ("off", "up", "down", "nearest"):
        results[mode] = train(mode, args.steps, args.tile_m, train_batches, eval_batches)
        print(f"{mode}: {results[mode]}", file=sys.stderr)
    exact = results["off"]
    print(f"tiny Qwen3-MoE (E=8, K=2, H=64), {args.steps} AdamW steps of {BATCH}×{SEQ} tokens, M={args.tile_m}; "
          f"task entropy floor {entropy:.3f} nats, uniform guess {math.log(VOCAB):.3f}\n")
    print("| routing in training | first loss | final train loss (last 20) | held-out loss, exact top-K | "
          "vs exact | train s |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        name = "exact top-K (off)" if mode == "off" else f"rounding {mode}"
        rel = "—" if mode == "off" else f"{100 * (r['eval'] / exact['eval'] - 1):+.1f} %"
        print(f"| {name} | {r['first']:.3f} | {r['train']:.3f} | {r['eval']:.3f} | {rel} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
