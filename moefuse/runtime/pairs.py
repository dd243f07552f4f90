"""Flat (token, expert) pairs: the routing of token rounding, which gives tokens a variable number of experts,
and the fused MoE op that runs them.

Buffers are sized by the upper bound S_max = T·K + E·(M−1) (M = tile_m); the true count lives only on the
device (token_offsets[T]), so nothing here needs a host sync.

  moefuse::moe_pairs(x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1?, b2?, spec, w3?)
      -> y [T, H]
  moefuse::moe_pairs_fwd(same) -> (y [T, H], h [S_max, N1])
  moefuse::moe_pairs_bwd(dy, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1?, b2?, h, spec, w3?)
      -> (dx, dpair_weight [S_max], dw1, dw2, db1, db2, dw3)     db1/db2/dw3 are empty tensors when absent

y[t] = Σ over t's pairs p (token_offsets[t] .. token_offsets[t+1]) of pair_weight[p] · expert pair_expert[p]
applied to x[t]; a token without pairs gets y[t] = 0. The same spec key, weight layouts and dtypes as
`moefuse::moe` (`runtime.op`); the same dispatch (CUDA or TRITON_INTERPRET=1 → the Triton kernels,
`kernels.moe.moe_pairs_forward` / `kernels.backward.moe_pairs_backward`, which are the [T, K] kernels with the
flat-pairs switch; other CPU tensors → `runtime.cpu`); the same memory-efficient backward as
`moefuse::moe_fwd` / `moe_bwd` (`runtime.autograd`): saved are the inputs and h, S_max·N1·itemsize(x) bytes.
Gradients flow to x, pair_weight (and through it to the router), w1, w2, b1, b2, w3; none to the ids. w3
[E, I, H] (last argument) is the up weights of a spec with `MoESpec.w3`, as in `moefuse::moe`.
`fused_moe_pairs` picks the inference or the training op by grad mode. Exact top-K is the special case
pair_token = arange(T·K) // K, pair_expert = topk_ids.flatten(), pair_weight = topk_weights.flatten(),
token_offsets = arange(T + 1)·K (`moefuse.rounding.exact_pairs`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moefuse.inputs import check_pairs_inputs
from moefuse.runtime.autograd import bias_grads, grads_fake, needs_grad, op_grads, w3_grad
from moefuse.runtime.cpu import moe_pairs_backward_cpu, moe_pairs_forward_cpu
from moefuse.runtime.op import _use_triton, counters
from moefuse.spec import MoESpec, spec_from_key

Tensor = torch.Tensor


class FlatPairs(NamedTuple):
    """Token-major (token, expert, weight) pairs.

    token:         [S_max] int32, the token of each pair, non-decreasing over the used prefix;
    expert:        [S_max] int32, the expert of each pair; −1 marks an unused slot (unused slots form the tail);
    weight:        [S_max] float (the routing weights' dtype), the combine weight, 0 in unused slots;
                   differentiable: gradients flow through it to the router;
    token_offsets: [T+1] int32, pairs of token t are [token_offsets[t], token_offsets[t+1]).
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    token_offsets: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------


def _forward(spec: str, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3, *,
             save_h: bool):
    s = spec_from_key(spec)
    check_pairs_inputs(s, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3)
    args = (s, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2)
    train = "fwd_train_" if save_h else ""
    if _use_triton(x):
        from moefuse.kernels.codegen import load_activation
        from moefuse.kernels.moe import moe_pairs_forward
        from moefuse.runtime.tuning import gemm_config

        counters[f"pairs_{train}triton"] += 1
        activation = load_activation(s.activation.expr, s.activation.num_inputs)
        # Tuned like the [T, K] op, bucketed on S_max; with token rounding no taller than the spec's tile_m.
        config = gemm_config(s, x, pair_expert.view(-1, 1),
                             lambda c: moe_pairs_forward(*args, activation=activation, config=c, w3=w3))
        return moe_pairs_forward(*args, activation=activation, config=config, save_h=save_h, w3=w3)
    counters[f"pairs_{train}cpu"] += 1
    return moe_pairs_forward_cpu(*args, save_h=save_h, w3=w3)


@torch.library.custom_op("moefuse::moe_pairs", mutates_args=())
def moe_pairs(
    x: Tensor,
    pair_token: Tensor,
    pair_expert: Tensor,
    pair_weight: Tensor,
    token_offsets: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    spec: str,
    w3: Tensor | None = None,
) -> Tensor:
    return _forward(spec, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3, save_h=False)


@moe_pairs.register_fake
def _moe_pairs_fake(x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, spec, w3=None):
    s = spec_from_key(spec)
    return x.new_empty((x.shape[0], s.hidden), dtype=getattr(torch, s.out_dtype))


@torch.library.custom_op("moefuse::moe_pairs_fwd", mutates_args=())
def moe_pairs_fwd(
    x: Tensor,
    pair_token: Tensor,
    pair_expert: Tensor,
    pair_weight: Tensor,
    token_offsets: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    spec: str,
    w3: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    return _forward(spec, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3, save_h=True)


@moe_pairs_fwd.register_fake
def _moe_pairs_fwd_fake(x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, spec, w3=None):
    s = spec_from_key(spec)
    y = x.new_empty((x.shape[0], s.hidden), dtype=getattr(torch, s.out_dtype))
    return y, x.new_empty((pair_expert.shape[0], s.up_rows))


@torch.library.custom_op("moefuse::moe_pairs_bwd", mutates_args=())
def moe_pairs_bwd(
    dy: Tensor,
    x: Tensor,
    pair_token: Tensor,
    pair_expert: Tensor,
    pair_weight: Tensor,
    token_offsets: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    h: Tensor,
    spec: str,
    w3: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    s = spec_from_key(spec)
    args = (dy, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h)
    if _use_triton(x):
        from moefuse.kernels.backward import moe_pairs_backward

        counters["pairs_bwd_triton"] += 1
        grads = moe_pairs_backward(s, *args, w3=w3)
    else:
        counters["pairs_bwd_cpu"] += 1
        grads = moe_pairs_backward_cpu(s, *args, w3=w3)
    return op_grads(x, *grads)


@moe_pairs_bwd.register_fake
def _moe_pairs_bwd_fake(dy, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h, spec,
                        w3=None):
    return grads_fake(spec_from_key(spec), x, pair_weight, w1, w2, b1, b2, w3)


def _setup_context(ctx, inputs, output):
    x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, spec, w3 = inputs
    _, h = output
    ctx.save_for_backward(x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h, w3)
    ctx.spec = spec
    ctx.mark_non_differentiable(h)


def _backward(ctx, dy, _dh):
    x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h, w3 = ctx.saved_tensors
    dx, dpair_weight, dw1, dw2, db1, db2, dw3 = torch.ops.moefuse.moe_pairs_bwd(
        dy, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h, ctx.spec, w3
    )
    return (dx, None, None, dpair_weight, None, dw1, dw2, *bias_grads(b1, b2, db1, db2), None, w3_grad(w3, dw3))


torch.library.register_autograd("moefuse::moe_pairs_fwd", _backward, setup_context=_setup_context)


def fused_moe_pairs(spec: MoESpec | str, x: Tensor, pairs: FlatPairs, w1: Tensor, w2: Tensor,
                    b1: Tensor | None = None, b2: Tensor | None = None, w3: Tensor | None = None) -> Tensor:
    """y [T, H] of the fused MoE on flat pairs: the training op when gradients flow through x, pairs.weight,
    the weights or biases, the inference op (no h kept) otherwise. Traceable by dynamo when `spec` is the key
    (`MoESpec.to_key()`, what compiled code passes); a MoESpec is an eager convenience."""
    key = spec if isinstance(spec, str) else spec.to_key()
    args = (x, pairs.token, pairs.expert, pairs.weight, pairs.token_offsets, w1, w2, b1, b2, key)
    if w3 is not None:
        args = (*args, w3)
    if needs_grad(x, pairs.weight, w1, w2, b1, b2, w3):
        return torch.ops.moefuse.moe_pairs_fwd(*args)[0]
    return torch.ops.moefuse.moe_pairs(*args)
