"""`moefuse::moe`: the fused MoE operation the compiler rewrites every detected layer into.

Boundary (the same as transformers' experts interface): (x[T,H], topk_ids[T,K], topk_weights[T,K], w1, w2,
b1?, b2?, spec) → y[T,H]; `spec` is `MoESpec.to_key()`, so the op stays a plain custom op that dynamo,
AOTAutograd and Inductor treat as opaque, with a fake implementation for tracing.

Dispatch, decided per call:
  - CUDA tensors → the Triton kernels, generated for the spec and cached;
  - CPU tensors with TRITON_INTERPRET=1 in the environment → the same Triton kernels on the interpreter
    (this is how the kernels are tested without a GPU);
  - other CPU tensors → `runtime.cpu`, an exact torch implementation of the same plan.
The training pair `moefuse::moe_fwd` / `moefuse::moe_bwd` (`runtime.autograd`) dispatches the same way.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from moefuse.inputs import check_layer_inputs
from moefuse.spec import MoESpec

log = logging.getLogger("moefuse.runtime")

# Calls by op and path, so tests can assert that the fused op really ran (and on which path): "triton"/"cpu"
# count `moefuse::moe`, "fwd_train_*"/"bwd_*" its training pair `moefuse::moe_fwd`/`moefuse::moe_bwd`.
counters: dict[str, int] = {
    "triton": 0, "cpu": 0, "fwd_train_triton": 0, "fwd_train_cpu": 0, "bwd_triton": 0, "bwd_cpu": 0,
    "pairs_triton": 0, "pairs_cpu": 0, "pairs_fwd_train_triton": 0, "pairs_fwd_train_cpu": 0, "pairs_bwd_triton": 0,
    "pairs_bwd_cpu": 0,  # the same for the flat-pairs ops moefuse::moe_pairs / moe_pairs_fwd / moe_pairs_bwd
}


@functools.lru_cache(maxsize=None)
def spec_from_key(key: str) -> MoESpec:
    return MoESpec.from_key(key)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("moefuse::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    s = spec_from_key(spec)
    check_layer_inputs(s, x, topk_ids, topk_weights, w1, w2, b1, b2)
    if _use_triton(x):
        from moefuse.runtime.triton_path import moe_forward_triton

        counters["triton"] += 1
        return moe_forward_triton(s, x, topk_ids, topk_weights, w1, w2, b1, b2)
    from moefuse.runtime.cpu import moe_forward_cpu

    counters["cpu"] += 1
    return moe_forward_cpu(s, x, topk_ids, topk_weights, w1, w2, b1, b2)


@moe.register_fake
def _moe_fake(x, topk_ids, topk_weights, w1, w2, b1, b2, spec):
    s = spec_from_key(spec)
    return x.new_empty((x.shape[0], s.hidden), dtype=getattr(torch, s.out_dtype))


def moe_call(spec: MoESpec, x, topk_ids, topk_weights, w1, w2, b1=None, b2=None) -> torch.Tensor:
    """Eager convenience: run the op for a spec object."""
    return torch.ops.moefuse.moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec.to_key())


def kernels_for(spec: MoESpec, device: torch.device) -> list[str]:
    """What will run a layer on `device`, for the report. On the Triton path this generates (and caches) the
    layer's activation epilogue now, so a codegen problem shows at compile time rather than at first call."""
    if not _use_triton(torch.empty(0, device=device)):
        return ["cpu: torch plan (stable argsort routing, grouped_mm over the expert-sorted rows, fp32 activation, fp32 bmm combine)"]
    from moefuse.kernels.codegen import load_activation

    path = load_activation(spec.activation.expr, spec.activation.num_inputs).fn.__code__.co_filename
    return [
        "triton routing metadata: per-block histogram → scan → stable scatter (no host sync)",
        f"triton grouped GEMM (up): x rows gathered in the load, epilogue act = {spec.activation.expr} "
        f"generated at {path}",
        "triton grouped GEMM (down): varlen-M over the expert-sorted rows",
        "triton combine: one program per token, fp32, no atomics",
    ]
