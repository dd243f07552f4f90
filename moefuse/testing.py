"""Tiny MoE models with random weights (no download), for tests, examples and benchmarks.

Needs `transformers` (the `test` extra). Each family keeps its own routing and expert code; only sizes shrink.
"""
from __future__ import annotations

import torch

from moefuse.metrics import rel_err  # noqa: F401  (re-exported: tests import it from here)

# Sizes shared by every family: small enough for CPU tests, large enough that E > K, I ≠ H, T > tile.
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=128)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    # A shared expert beside the routed ones (sigmoid-gated in Qwen2-MoE, plain in DeepSeek-V3 and GLM4-MoE)
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    # Sigmoid scores + correction bias + group-limited top-k + renormalisation + routed_scaling_factor
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                             n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                             routed_scaling_factor=2.5)),
    # Transposed, interleaved gate_up_proj with biases; clamped (up+1)·gate·σ(1.702·gate); top-k → softmax
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                     layer_types=["full_attention", "full_attention"])),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                       num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                       n_group=1, topk_group=1)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                      layer_types=["full_attention", "full_attention"])),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8,
                                                moe_k=2, moe_layer_start_index=0, moe_num_shared_experts=1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=32, num_experts=8, moe_topk=2)),
    # Top-1 sigmoid routing with the weight applied to the expert *input*, dense bmm over every expert, a
    # shared expert beside them
    "llama4": ("Llama4TextConfig", dict(intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8,
                                        num_experts_per_tok=1, interleave_moe_layer_step=1)),
}

# Families whose experts dynamo cannot capture (a Python loop, a host sync): `moefuse.convert(model)` first.
# Kept apart from FAMILIES, whose tests compile the model as it is.
CONVERT_FAMILIES = {
    # per-expert stacked linears run by splitting tokens with a tolist() (also in its attention experts)
    "jetmoe": ("JetMoeConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                    kv_channels=16, num_key_value_heads=4)),
    # 2-D w1/v1/w2 of E·F rows, an eager loop over the experts hit
    "dbrx": ("DbrxConfig", dict(vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
                                attn_config=dict(kv_n_heads=2, clip_qkv=8.0))),
}
_OWN_SIZES = {"dbrx"}  # sizes named differently: _COMMON does not apply


def tiny_config(family: str, **overrides):
    import transformers

    families = {**FAMILIES, **CONVERT_FAMILIES}
    if family not in families:
        raise ValueError(f"unknown family {family!r}; known: {sorted(families)}")
    cls_name, sizes = families[family]
    config = getattr(transformers, cls_name)(**{**({} if family in _OWN_SIZES else _COMMON), **sizes, **overrides})
    if family == "dbrx":
        # transformers 5.24's DBRX attention reads attn_config.rope_theta (unused) at construction
        config.attn_config.rope_theta = 10000.0
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A causal LM of `family` with random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval().to(dtype)


def tiny_switch(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A Switch Transformers seq2seq model (no causal-LM class) with random weights, in eval mode: one sparse
    layer in the encoder and one in the decoder, top-1 routing with `expert_capacity` (default 3 for the
    18 tokens of a [2, 9] batch, so some tokens overflow and are dropped), no dropout."""
    import transformers

    sizes = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                 num_experts=8, expert_capacity=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                 dropout_rate=0.0)
    torch.manual_seed(seed)
    config = transformers.SwitchTransformersConfig(**{**sizes, **overrides})
    return transformers.SwitchTransformersForConditionalGeneration(config).eval().to(dtype)


def num_moe_layers(model) -> int:
    """MoE blocks in a transformers model: modules holding 3-D expert weights (`gate_up_proj`)."""
    return sum(1 for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter))


# ---------------------------------------------------------------------------------------------------------
# Derived reduced-precision tolerances: moefuse's error bounded by a small multiple of eager's
# ---------------------------------------------------------------------------------------------------------

# The rule lives in moefuse.tolerance (verification applies it too); re-exported for the tests.
from moefuse.tolerance import EAGER_FACTOR, OUTPUT_ROUNDINGS, UNIT_ROUNDOFF, parity_bound  # noqa: E402,F401


def assert_parity(got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """moefuse's result `got` is as close to `ref` as eager's `eager` is, up to `parity_bound` (see
    EAGER_FACTOR); `got` and `eager` computed in `dtype` from the same inputs, `ref` in a wider dtype."""
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    if ref.numel() == 0:
        return
    err = (got.double() - ref.double()).abs().max().item()
    bound = parity_bound(eager, ref, dtype)
    err_eager = (eager.double() - ref.double()).abs().max().item()
    assert err <= bound, (f"{what}: max |moefuse - ref| {err:.3e} > bound {bound:.3e} (eager's error "
                          f"{err_eager:.3e}, max |ref| {ref.abs().max().item():.3e}, {dtype})")


def fp32_twin(model):
    """A float32 copy of `model` (its dtype-valued weights widened exactly): the one reference against which both
    moefuse's and eager's reduced-precision outputs are measured (`assert_parity`)."""
    import copy

    return copy.deepcopy(model).float()


def assert_model_parity(got: torch.Tensor, eager: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype,
                        fp32_tol: float = 1e-4, what: str = "") -> None:
    """A model's compiled output `got` against eager's `eager`: fp32 within `fp32_tol` relative to eager's
    (sums in another order, a few ulps through a few layers); fp16 / bf16 by `assert_parity` against `ref32`,
    the output of `fp32_twin(model)` on the same inputs."""
    if dtype == torch.float32:
        err = rel_err(got, eager)
        assert err <= fp32_tol, f"{what}: relative error {err:.3g} > {fp32_tol:g}"
    else:
        assert_parity(got, eager, ref32, dtype, what=what)


# ---------------------------------------------------------------------------------------------------------
# bf16 tl.dot under Triton's interpreter
# ---------------------------------------------------------------------------------------------------------


def triton_version() -> str:
    import triton

    return triton.__version__


def bf16_bits_to_f32(bits):
    """bf16 bit patterns (a numpy uint16 array, as Triton's interpreter stores bf16) → the same values as numpy
    float32, exactly: a bf16 is the upper half of the fp32 with the same value (NaN payloads, infinities and
    subnormals included), so the conversion is a 16-bit shift, no rounding."""
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values):
    """numpy float32 → bf16 bit patterns (uint16), rounded to nearest, ties to even — as a GPU's cvt.rn.bf16.f32
    and torch's conversion round; NaNs stay (quiet) NaNs, overflow goes to ±inf."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    return np.where(nan, ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def install_interpreter_bf16_dot() -> bool:
    """Make Triton's interpreter compute bf16 like a GPU; returns whether the patch was installed (False when
    already installed). Test-time only: nothing in moefuse calls it. Two interpreter defects are patched:

    - `tl.dot`: the interpreter stores bf16 as uint16 bit patterns and its `create_dot` hands them to
      `np.matmul`, which multiplies the raw integers (triton issue 11584). bf16 operands are converted to fp32
      exactly (`bf16_bits_to_f32`) before the interpreter's own dot, which then multiplies in fp32 — exact for
      bf16 operands (8-bit × 8-bit significands fit fp32's 24) — and accumulates in the accumulator's dtype
      (fp32 in every moefuse kernel), as a GPU's bf16 MMA does. A bf16 accumulator is refused: no moefuse kernel
      has one, and the interpreter would misread it the same way.
    - casts to bf16: the interpreter truncates fp32 → bf16 (an error of up to 2⁻⁷ relative instead of 2⁻⁸, and
      biased toward zero) and reinterprets fp16 ↔ bf16 as integers; the patch rounds to nearest even
      (`f32_to_bf16_bits`) from the value, as the GPU does."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_dot, real_cast = getattr(builder, "create_dot", None), getattr(builder, "cast_impl", None)
    if real_dot is None or real_cast is None:  # another Triton's interpreter: tests/test_bf16_shim.py says so
        raise RuntimeError(f"triton {triton_version()}: the interpreter has no create_dot / cast_impl to patch")
    if getattr(real_dot, "_moefuse_bf16", False):
        return False

    def as_f32(t):
        if t.dtype != tl.bfloat16:
            return t
        return interpreter.TensorHandle(bf16_bits_to_f32(t.data), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if d.dtype == tl.bfloat16:
            raise NotImplementedError("interpreter bf16 shim: a bf16 accumulator is not supported (use fp32)")
        return real_dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty.is_floating() and dst_ty != tl.bfloat16:
            return real_cast(self, as_f32(src), dst_type)
        if dst_ty == tl.bfloat16 and src_ty.is_floating() and src_ty != tl.bfloat16:
            return interpreter.TensorHandle(f32_to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        return real_cast(self, src, dst_type)

    create_dot._moefuse_bf16 = True
    create_dot._moefuse_real = (real_dot, real_cast)
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    return True


def uninstall_interpreter_bf16_dot() -> None:
    """Undo `install_interpreter_bf16_dot` (for the test that shows the interpreter's own bf16 arithmetic)."""
    from triton.runtime import interpreter

    real = getattr(interpreter.InterpreterBuilder.create_dot, "_moefuse_real", None)
    if real is not None:
        interpreter.InterpreterBuilder.create_dot, interpreter.InterpreterBuilder.cast_impl = real
