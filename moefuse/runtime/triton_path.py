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


def triton_refusal(spec: MoESpec, training: bool) -> str | None:
    """Why the Triton kernels would refuse `spec` (None when they run it): what verification reports instead of
    lowering a region the kernels would raise on at the first call. The fused backward writes each row of dH
    from one activation input, so training refuses slices that read the same up-projection rows twice
    (`silu(h[..., :I]) * h[..., :I]`); the forward runs any slices."""
    if training:
        from moefuse.kernels.backward import _rows_read

        overlap, _ = _rows_read(spec)
        if overlap:
            return (f"activation slices {spec.activation.slices} read up-projection rows {list(overlap[:4])}… "
                    "twice: the Triton backward writes each row of dH from one input; express the activation "
                    "with one input reading those rows (e.g. silu(h) * h as one slice)")
    return None
