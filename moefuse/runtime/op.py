"""`moefuse::moe`: the fused MoE operation the compiler rewrites every detected layer into.

Boundary (the same as transformers' experts interface): (x[T,H], topk_ids[T,K], topk_weights[T,K], w1, w2,
b1?, b2?, spec) → y[T,H]; `spec` is `MoESpec.to_key()`, so the op stays a plain custom op that dynamo,
AOTAutograd and Inductor treat as opaque, with a fake implementation for tracing. Optional trailing
arguments `shared_w1, shared_w2, shared_gate, shared_w3` carry the layer's shared expert when the spec has
one (`MoESpec.shared`): y then also holds its output, computed by `runtime.shared` — on CUDA on a side
stream while the routed experts run, on the CPU after them. `shared_x` [T, H]: the tokens the shared expert
reads when they are not x (Llama4 scales x by the routing weight for the routed experts only). The last
argument `w3` [E, I, H] is the routed experts' up weights when the spec holds gate and up as two tensors
(`MoESpec.w3`; w1 [E, I, H] is then the gate's), else None.

Dispatch, decided per call:
  - CUDA tensors → the Triton kernels, generated for the spec and cached;
  - CPU tensors with TRITON_INTERPRET=1 in the environment → the same Triton kernels on the interpreter
    (this is how the kernels are tested without a GPU);
  - other CPU tensors → `runtime.cpu`: C++ kernels generated for the spec (`kernels.cpu`), or where they cannot
    run (no compiler, fp16, an odd weight layout) an exact torch implementation of the same plan.
The training pair `moefuse::moe_fwd` / `moefuse::moe_bwd` (`runtime.autograd`) dispatches the same way.
"""
from __future__ import annotations

import logging
import os

import torch

from moefuse.errors import InputError
from moefuse.inputs import check_layer_inputs
from moefuse.runtime.shared import overlapped, shared_forward
from moefuse.spec import MoESpec, spec_from_key

log = logging.getLogger("moefuse.runtime")

# Calls by op and path, so tests can assert that the fused op really ran (and on which path): "triton"/"cpu"
# count `moefuse::moe`, "fwd_train_*"/"bwd_*" its training pair `moefuse::moe_fwd`/`moefuse::moe_bwd`.
counters: dict[str, int] = {
    "triton": 0, "cpu": 0, "fwd_train_triton": 0, "fwd_train_cpu": 0, "bwd_triton": 0, "bwd_cpu": 0,
    "pairs_triton": 0, "pairs_cpu": 0, "pairs_fwd_train_triton": 0, "pairs_fwd_train_cpu": 0, "pairs_bwd_triton": 0,
    "pairs_bwd_cpu": 0,  # the same for the flat-pairs ops moefuse::moe_pairs / moe_pairs_fwd / moe_pairs_bwd
}


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
    shared_w1: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
    shared_w3: torch.Tensor | None = None,
    shared_x: torch.Tensor | None = None,
    w3: torch.Tensor | None = None,
) -> torch.Tensor:
    s = spec_from_key(spec)
    routed = s.routed()  # the kernels, their caches and tuning see the routed experts only
    check_layer_inputs(routed, x, topk_ids, topk_weights, w1, w2, b1, b2, w3)
    shared = shared_call(s, x, shared_w1, shared_w2, shared_gate, shared_w3, shared_x)
    if _use_triton(x):
        from moefuse.runtime.triton_path import moe_forward_triton

        counters["triton"] += 1
        y, sy = overlapped(x, shared, lambda: moe_forward_triton(routed, x, topk_ids, topk_weights, w1, w2, b1, b2,
                                                                      w3=w3))
    else:
        from moefuse.runtime.cpu import moe_forward_cpu

        counters["cpu"] += 1
        y, sy = overlapped(x, shared, lambda: moe_forward_cpu(routed, x, topk_ids, topk_weights, w1, w2, b1, b2,
                                                                   w3=w3))
    return y if sy is None else y.add_(sy)


def shared_call(s: MoESpec, x, shared_w1, shared_w2, shared_gate, shared_w3, shared_x=None):
    """A thunk computing the spec's shared expert on x, or on shared_x when given (for
    `runtime.shared.overlapped`), or None without one. Raises `InputError` when the shared arguments and the
    spec disagree."""
    given = any(t is not None for t in (shared_w1, shared_w2, shared_gate, shared_w3, shared_x))
    if s.shared is None:
        if given:
            raise InputError("shared expert weights were passed but the spec has no shared expert (MoESpec.shared)")
        return None
    if shared_w1 is None or shared_w2 is None:
        raise InputError("the spec has a shared expert: pass shared_w1 and shared_w2 (and shared_gate if gated)")
    if shared_x is not None and shared_x.shape != x.shape:
        raise InputError(f"shared_x: expected the shape of x {tuple(x.shape)}, got {tuple(shared_x.shape)}")
    sx = x if shared_x is None else shared_x
    return lambda: shared_forward(s.shared, sx, shared_w1, shared_w3, shared_w2, shared_gate)


@moe.register_fake
def _moe_fake(x, topk_ids, topk_weights, w1, w2, b1, b2, spec, shared_w1=None, shared_w2=None, shared_gate=None,
              shared_w3=None, shared_x=None, w3=None):
    s = spec_from_key(spec)
    return x.new_empty((x.shape[0], s.hidden), dtype=getattr(torch, s.out_dtype))


def moe_call(spec: MoESpec, x, topk_ids, topk_weights, w1, w2, b1=None, b2=None, w3=None) -> torch.Tensor:
    """Eager convenience: run the op for a spec object (w3: the up weights of a spec with `MoESpec.w3`)."""
    if w3 is None:
        return torch.ops.moefuse.moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec.to_key())
    return torch.ops.moefuse.moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec.to_key(), w3=w3)


def kernels_for(spec: MoESpec, device: torch.device) -> list[str]:
    """What will run a layer on `device`, for the report. On the Triton path this generates (and caches) the
    layer's activation epilogue now, so a codegen problem shows at compile time rather than at first call."""
    if not _use_triton(torch.empty(0, device=device)):
        from moefuse.kernels.cpu import describe

        return describe(spec)
    from moefuse.kernels.codegen import load_activation

    path = load_activation(spec.activation.expr, spec.activation.num_inputs).fn.__code__.co_filename
    return [
        "triton routing metadata: per-block histogram → scan → stable scatter (no host sync)",
        f"triton grouped GEMM (up): x rows gathered in the load, "
        + ("gate w1 and up w3 read by two weight pointers, " if spec.w3 else "")
        + f"epilogue act = {spec.activation.expr} generated at {path}",
        "triton grouped GEMM (down): varlen-M over the expert-sorted rows",
        "triton combine: one program per token, fp32, no atomics",
    ]
