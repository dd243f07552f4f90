"""The Triton path of `moefuse::moe`: the activation epilogue generated from the spec, then the kernels."""
from __future__ import annotations


from moefuse.kernels.codegen import load_activation
from moefuse.kernels.moe import moe_forward
from moefuse.runtime.tuning import gemm_config
from moefuse.spec import MoESpec


def moe_forward_triton(spec: MoESpec, x, topk_ids, topk_weights, w1, w2, b1=None, b2=None, *, save_h=False,
                       w3=None):
    """y, or (y, h) with save_h (the training op's forward), from the kernels with the spec's epilogue; w3: the
    up weights of a spec with `MoESpec.w3`. Tuning keys on the spec, which says whether w3 exists (the up
    GEMM's code differs), so the split layout is tuned apart."""
    activation = load_activation(spec.activation.expr, spec.activation.num_inputs)
    config = gemm_config(spec, x, topk_ids, lambda c: moe_forward(spec, x, topk_ids, topk_weights, w1, w2, b1, b2,
                                                                  activation=activation, config=c, w3=w3))
    return moe_forward(spec, x, topk_ids, topk_weights, w1, w2, b1, b2, activation=activation, config=config,
                       save_h=save_h, w3=w3)
