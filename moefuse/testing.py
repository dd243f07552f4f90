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


