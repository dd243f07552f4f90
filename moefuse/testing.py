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
