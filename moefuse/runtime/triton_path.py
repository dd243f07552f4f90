"""The Triton path of `moefuse::moe`: the activation epilogue generated from the spec, then the kernels."""
from __future__ import annotations

import torch

from moefuse.kernels.codegen import load_activation
from moefuse.kernels.moe import moe_forward
from moefuse.spec import MoESpec


def moe_forward_triton(spec: MoESpec, x, topk_ids, topk_weights, w1, w2, b1=None, b2=None) -> torch.Tensor:
    activation = load_activation(spec.activation.expr, spec.activation.num_inputs)
    return moe_forward(spec, x, topk_ids, topk_weights, w1, w2, b1, b2, activation=activation)
