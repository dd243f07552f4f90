"""The training path of the fused MoE: `moefuse::moe_fwd`, `moefuse::moe_bwd` and the autograd formula that
joins them (SonicMoE's memory-efficient backward).

  moefuse::moe_fwd(x, topk_ids, topk_weights, w1, w2, b1?, b2?, spec, …, w3?) -> (y [T,H], h [T·K, N1])
  moefuse::moe_bwd(dy, x, topk_ids, topk_weights, w1, w2, b1?, b2?, h, spec, …, w3?)
      -> (dx, dtopk_weights, dw1, dw2, db1, db2, …, dw3)      db1/db2/dw3 are empty tensors when absent

w3 [E, I, H], the last argument of both ops, is the up weights of a spec that holds gate and up as two tensors
(`MoESpec.w3`; w1 [E, I, H] is then the gate's); h keeps the layout of the virtual [w1; w3] (N1 = 2·I), and
moe_bwd's last output is dw3.

h is the pre-activation up-projection (b1 included) in expert-sorted order, in x's dtype; rows of dropped
pairs are zero. Saved for backward: the op's inputs (x, topk_ids, topk_weights, w1, w2, b1, b2 — already
alive, so no extra memory) and h, S·N1·itemsize(x) bytes (S = T·K; 2·T·K·I·itemsize for a GLU) — never the
gathered x, A or Y: the backward recomputes A from h and never forms Y or dY. Gradients flow to x,
topk_weights (and from there into the router, which stays in the graph), w1, w2, b1, b2; none to topk_ids;
h is not differentiable.

With a shared expert in the spec (`MoESpec.shared`), both ops take its weights as optional trailing
arguments `shared_w1, shared_w2, shared_gate, shared_w3, shared_x` (as `moefuse::moe` does): moe_fwd adds
its output to y (on CUDA computed on a side stream while the routed experts run), and moe_bwd returns their
gradients after the six above — dshared_w1, dshared_w2, dshared_gate, dshared_w3, dshared_x (empty when
absent), before dw3, which stays last — and adds the shared path's dx to dx when the shared expert reads x
itself (no shared_x). Nothing of the shared MLP is saved: moe_bwd recomputes it from its input
(`runtime.shared`).

Inference uses the plain `moefuse::moe` op (`runtime.op`), which keeps no h: the compiler emits this pair
only when gradients are needed. Under `torch.no_grad()` / `inference_mode` moe_fwd still computes h (it is
an output of the op), but nothing is saved and h is freed as soon as the caller drops it.

Dispatch is `runtime.op`'s: CUDA tensors or TRITON_INTERPRET=1 → the Triton kernels
(`kernels.moe.moe_forward(..., save_h=True)`, `kernels.backward.moe_backward`); other CPU tensors →
`runtime.cpu`. Both ops are opaque custom ops with fake implementations, so dynamo, AOTAutograd and Inductor
trace them without looking inside.
"""
from __future__ import annotations

import functools

import torch

from moefuse.inputs import check_layer_inputs
from moefuse.runtime.cpu import moe_backward_cpu, moe_forward_cpu
from moefuse.runtime.op import _use_triton, counters, shared_call
from moefuse.runtime.shared import overlapped, shared_backward
from moefuse.spec import MoESpec, spec_from_key

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Forward: y and the pre-activation h
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moefuse::moe_fwd", mutates_args=())
def moe_fwd(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    spec: str,
    shared_w1: Tensor | None = None,
    shared_w2: Tensor | None = None,
    shared_gate: Tensor | None = None,
    shared_w3: Tensor | None = None,
    shared_x: Tensor | None = None,
    w3: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    s = spec_from_key(spec)
    routed = s.routed()
    check_layer_inputs(routed, x, topk_ids, topk_weights, w1, w2, b1, b2, w3)
    shared = shared_call(s, x, shared_w1, shared_w2, shared_gate, shared_w3, shared_x)
    if _use_triton(x):
        from moefuse.runtime.triton_path import moe_forward_triton

        counters["fwd_train_triton"] += 1
        (y, h), sy = overlapped(x, shared, lambda: moe_forward_triton(routed, x, topk_ids, topk_weights, w1, w2, b1, b2,
                                                                      save_h=True, w3=w3))
    else:
        counters["fwd_train_cpu"] += 1
        (y, h), sy = overlapped(x, shared, lambda: moe_forward_cpu(routed, x, topk_ids, topk_weights, w1, w2, b1, b2,
                                                                   save_h=True, w3=w3))
    return (y if sy is None else y.add_(sy)), h


@moe_fwd.register_fake
def _moe_fwd_fake(x, topk_ids, topk_weights, w1, w2, b1, b2, spec, shared_w1=None, shared_w2=None, shared_gate=None,
                  shared_w3=None, shared_x=None, w3=None):
    s = spec_from_key(spec)
    y = x.new_empty((x.shape[0], s.hidden), dtype=getattr(torch, s.out_dtype))
    h = x.new_empty((topk_ids.shape[0] * topk_ids.shape[1], s.up_rows))
    return y, h


# ---------------------------------------------------------------------------------------------------------
# Backward: every gradient in one call
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moefuse::moe_bwd", mutates_args=())
def moe_bwd(
    dy: Tensor,
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    h: Tensor,
    spec: str,
    shared_w1: Tensor | None = None,
    shared_w2: Tensor | None = None,
    shared_gate: Tensor | None = None,
    shared_w3: Tensor | None = None,
    shared_x: Tensor | None = None,
    w3: Tensor | None = None,
) -> list[Tensor]:
    s = spec_from_key(spec)
    routed = s.routed()
    shared = None
    if shared_call(s, x, shared_w1, shared_w2, shared_gate, shared_w3, shared_x) is not None:
        sx = x if shared_x is None else shared_x
        shared = functools.partial(shared_backward, s.shared, dy, sx, shared_w1, shared_w3, shared_w2, shared_gate)
    if _use_triton(x):
        from moefuse.kernels.backward import moe_backward

        counters["bwd_triton"] += 1
        grads, sgrads = overlapped(
            x, shared, lambda: moe_backward(routed, dy, x, topk_ids, topk_weights, w1, w2, b1, b2, h, w3=w3))
    else:
        counters["bwd_cpu"] += 1
        grads, sgrads = overlapped(
            x, shared, lambda: moe_backward_cpu(routed, dy, x, topk_ids, topk_weights, w1, w2, b1, b2, h, w3=w3))
    *out, dw3 = op_grads(x, *grads)
    if sgrads is None:
        return out + [dw3]
    dsx, dsw1, dsw3, dsw2, dsgate = sgrads
    if shared_x is None:  # the shared expert read x: its dx joins the routed experts'
        out[0] = out[0] + dsx
    return out + [dsw1, dsw2, x.new_empty(0) if dsgate is None else dsgate, x.new_empty(0) if dsw3 is None else dsw3,
                  x.new_empty(0) if shared_x is None else dsx, dw3]


def op_grads(x: Tensor, dx, drouting, dw1, dw2, db1, db2, dw3) -> tuple[Tensor, ...]:
    """The backward ops' outputs, dw3 last: a custom op cannot return None (nor one tensor twice), so an absent
    bias or w3 gets its own empty gradient, mapped back to None by `bias_grads` / `w3_grad`."""
    return (dx, drouting, dw1, dw2, x.new_empty(0) if db1 is None else db1, x.new_empty(0) if db2 is None else db2,
            x.new_empty(0) if dw3 is None else dw3)


def bias_grads(b1, b2, db1: Tensor, db2: Tensor) -> tuple[Tensor | None, Tensor | None]:
    return (db1 if b1 is not None else None, db2 if b2 is not None else None)


def w3_grad(w3, dw3: Tensor) -> Tensor | None:
    return dw3 if w3 is not None else None


def grads_fake(s: MoESpec, x, routing_weights, w1, w2, b1, b2, w3=None) -> tuple[Tensor, ...]:
    """The backward ops' fake outputs (see `op_grads`); the routing weights' gradient has their shape."""
    E, H, I, N1 = s.num_experts, s.hidden, s.intermediate, s.up_rows  # noqa: E741
    return (
        x.new_empty(x.shape),
        routing_weights.new_empty(routing_weights.shape),
        w1.new_empty((E, N1 if w3 is None else I, H)),
        w2.new_empty((E, H, I)),
        b1.new_empty((E, N1)) if b1 is not None else x.new_empty(0),
        b2.new_empty((E, H)) if b2 is not None else x.new_empty(0),
        w3.new_empty((E, I, H)) if w3 is not None else x.new_empty(0),
    )


@moe_bwd.register_fake
def _moe_bwd_fake(dy, x, topk_ids, topk_weights, w1, w2, b1, b2, h, spec, shared_w1=None, shared_w2=None,
                  shared_gate=None, shared_w3=None, shared_x=None, w3=None):
    s = spec_from_key(spec)
    *out, dw3 = grads_fake(s, x, topk_weights, w1, w2, b1, b2, w3)
    if s.shared is None:
        return out + [dw3]
    return out + [shared_w1.new_empty(shared_w1.shape), shared_w2.new_empty(shared_w2.shape),
                  x.new_empty(0) if shared_gate is None else shared_gate.new_empty(shared_gate.shape),
                  x.new_empty(0) if shared_w3 is None else shared_w3.new_empty(shared_w3.shape),
                  x.new_empty(0) if shared_x is None else shared_x.new_empty(shared_x.shape), dw3]


# ---------------------------------------------------------------------------------------------------------
# Autograd: save the inputs and h, nothing else
# ---------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, w1, w2, b1, b2, spec, *rest = inputs
    rest = list(rest) + [None] * (6 - len(rest))  # trailing arguments left at their default
    _, h = output
    # the shared weights and w3 are inputs (alive anyway): saving them costs nothing, the shared MLP is recomputed
    ctx.save_for_backward(x, topk_ids, topk_weights, w1, w2, b1, b2, h, *rest)
    ctx.spec = spec
    ctx.mark_non_differentiable(h)


def _backward(ctx, dy, _dh):
    x, topk_ids, topk_weights, w1, w2, b1, b2, h, *shared, w3 = ctx.saved_tensors
    dx, dtopk_weights, dw1, dw2, db1, db2, *dshared, dw3 = torch.ops.moefuse.moe_bwd(
        dy, x, topk_ids, topk_weights, w1, w2, b1, b2, h, ctx.spec, *shared, w3
    )
    # an absent shared weight (no shared expert, no gate, no shared w3) gets no gradient
    dshared = [d if w is not None else None for w, d in zip(shared, dshared + [None] * (5 - len(dshared)))]
    return (dx, None, dtopk_weights, dw1, dw2, *bias_grads(b1, b2, db1, db2), None, *dshared, w3_grad(w3, dw3))


torch.library.register_autograd("moefuse::moe_fwd", _backward, setup_context=_setup_context)


def moe_train_call(spec: MoESpec, x, topk_ids, topk_weights, w1, w2, b1=None, b2=None, w3=None) -> Tensor:
    """Eager convenience: y of the training op for a spec object (h stays inside the autograd graph)."""
    y, _ = torch.ops.moefuse.moe_fwd(x, topk_ids, topk_weights, w1, w2, b1, b2, spec.to_key(), w3=w3)
    return y


def fused_moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec: str, w3=None) -> Tensor:
    """y of the fused MoE for a spec key: the training op when gradients flow through any input, the
    inference op (no h kept) otherwise. Traceable by dynamo (what `moefuse.convert`'s modules call).
    w3: the up weights of a spec with `MoESpec.w3`."""
    if w3 is None:  # the call without w3 unchanged, so graphs of existing layers stay the same
        if needs_grad(x, topk_weights, w1, w2, b1, b2):
            return torch.ops.moefuse.moe_fwd(x, topk_ids, topk_weights, w1, w2, b1, b2, spec)[0]
        return torch.ops.moefuse.moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec)
    if needs_grad(x, topk_weights, w1, w2, b1, b2, w3):
        return torch.ops.moefuse.moe_fwd(x, topk_ids, topk_weights, w1, w2, b1, b2, spec, w3=w3)[0]
    return torch.ops.moefuse.moe(x, topk_ids, topk_weights, w1, w2, b1, b2, spec, w3=w3)


def needs_grad(*differentiable: Tensor | None) -> bool:
    """Whether gradients will flow through any of these inputs (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
