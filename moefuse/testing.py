"""Tiny MoE models with random weights (no download), for tests, examples and benchmarks.

Needs `transformers` (the `test` extra). Each family keeps its own routing and expert code; only sizes shrink.
"""
from __future__ import annotations

import torch

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
}


def tiny_config(family: str, **overrides):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    cls_name, sizes = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **sizes, **overrides})


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A causal LM of `family` with random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval().to(dtype)


def num_moe_layers(model) -> int:
    """MoE blocks in a transformers model: modules holding 3-D expert weights (`gate_up_proj`)."""
    return sum(1 for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32: the error measure of every parity check against eager."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
