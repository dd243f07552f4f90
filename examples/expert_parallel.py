"""Expert parallelism on the CPU: a tiny DeepSeek-V3 with its experts sharded over the ranks, compiled.

    torchrun --nproc-per-node 2 examples/expert_parallel.py        # or 4: E=8 experts, 8 % W must be 0

Every rank builds the same model (same seed), keeps E/W experts of each layer, compiles it with moefuse
(Inductor: 20 s warm, 2 min on a cold cache and busy CPU), runs forward and backward on its own slice of a
batch, then the whole batch on an unsharded copy. Each rank prints its compile report (each MoE layer runs
moefuse::ep_moe), its traffic per layer and how far its outputs and gradients are from that single-process
run (replicated gradients summed over the ranks first, as data parallelism would). Output of a 2-rank run:

    graph 0: 2 MoE layer(s) lowered, 0 rejected; rest → inductor
      LOWERED  model.layers.0.mlp.experts → ep_moe (training: fused forward + backward): E=4 K=1 H=64 ...
               expert parallel: world 2, experts [0, 4) local; tokens by all-to-all, one row per token and ...
    ...
    model.layers.0.mlp.experts: rank 0: sent 32 pairs in 16 rows [8, 8], received 40 pairs in 20 rows [8, 12],
        load per rank [40, 24] pairs, imbalance 1.25, calls 1
    ...
    rank 0: logits rel err 2.5e-07, worst gradient rel err 9.9e-07

(DeepSeek-V3's group-limited routing keeps each token's experts in one group of E/2, here one rank: each
token goes to one rank as one row, half the rows of one row per pair.)
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import moefuse
from moefuse import parallel
from moefuse.testing import rel_err, tiny_model

ROWS, SEQ = 2, 8  # per rank


def main():
    os.environ.pop("TRITON_INTERPRET", None)  # the fused op's torch CPU path
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    reference = tiny_model("deepseek_v3").train()
    model = copy.deepcopy(reference)
    summary = moefuse.parallelize_experts(model)  # the default group: every rank
    if rank == 0:
        print(summary)

    # One graph per model, the expert-parallel op inside it (see moefuse.parallel on this setting).
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    compiled = torch.compile(model, backend="moefuse")

    ids = torch.randint(0, 128, (ROWS * world, SEQ), generator=torch.Generator().manual_seed(0))
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    logits = compiled(ids[mine]).logits
    (logits.pow(2).sum() / ids.numel()).backward()

    want = reference(ids).logits
    (want.pow(2).sum() / ids.numel()).backward()
    ref_grads = dict(reference.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):  # this rank's experts: every rank's tokens already summed in
            worst = max(worst, rel_err(p.grad.to_local(), ref_grads[name].grad.chunk(world)[rank]))
        else:  # replicated: reduce as for any data-parallel parameter
            dist.all_reduce(p.grad)
            worst = max(worst, rel_err(p.grad, ref_grads[name].grad))

    for r in range(world):  # one rank at a time, so the lines do not interleave
        if r == rank:
            print(moefuse.last_report())  # each layer: "expert parallel: world W, experts [a, b) local"
            for layer, s in parallel.stats(model).items():
                print(f"{layer}: {s}")
            print(f"rank {rank}: logits rel err {rel_err(logits, want[mine]):.1e}, "
                  f"worst gradient rel err {worst:.1e}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
