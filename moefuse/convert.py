"""moefuse.convert: lower MoE layers that dynamo cannot capture, at module level.

transformers' `experts_implementation="eager"` runs the experts in a Python loop over the experts that were
hit (a data-dependent loop: dynamo breaks the graph there and no backend ever sees the experts). `convert`
gives such models the fused op directly, through transformers' own experts interface (no class is patched):

    summary = moefuse.convert(model)     # every experts module now calls moefuse::moe
    print(summary)
    compiled = torch.compile(model, backend="moefuse")   # the backend sees one moefuse::moe node per layer

The converted model also runs without compiling (the op's CPU path or its Triton kernels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from moefuse.passes.detect import capture_activation
from moefuse.passes.region import Reject
from moefuse.runtime.autograd import fused_moe
from moefuse.spec import MoESpec

log = logging.getLogger("moefuse.convert")

IMPLEMENTATION = "moefuse"  # the name registered in transformers' ExpertsInterface


@dataclass
class ConvertSummary:
    converted: list[str] = field(default_factory=list)  # module paths now calling moefuse::moe
    skipped: dict[str, str] = field(default_factory=dict)  # module path → why it was left as it was

    def __str__(self) -> str:
        lines = [f"moefuse.convert: {len(self.converted)} experts module(s) converted, {len(self.skipped)} skipped"]
        lines += [f"  CONVERTED {m}" for m in self.converted]
        lines += [f"  SKIPPED   {m}: {why}" for m, why in self.skipped.items()]
        return "\n".join(lines)


def _is_interface_experts(m: torch.nn.Module) -> bool:
    """A module built with transformers' `@use_experts_implementation` (3-D stacked expert weights)."""
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)


def _weights(m):
    w1 = m.gate_up_proj if m.has_gate else m.up_proj
    b1 = (m.gate_up_proj_bias if m.has_gate else m.up_proj_bias) if m.has_bias else None
    b2 = m.down_proj_bias if m.has_bias else None
    w2 = m.down_proj
    if m.is_transposed:  # stored [E, in, out]: the op takes [E, out, in], a view, never a copy
        w1, w2 = w1.transpose(-2, -1), w2.transpose(-2, -1)
    return w1, w2, b1, b2


def _why_not(m) -> str | None:
    if getattr(m, "has_post_expert_norm", False):
        return "a norm after each expert (has_post_expert_norm) is not part of the fused op yet"
    if getattr(m, "_is_expert_parallel", False):
        return "the experts are sharded for expert parallelism by transformers; moefuse's EP is separate"
    if not getattr(m, "is_concatenated", True) and m.has_gate and not hasattr(m, "_apply_gate"):
        return "an interleaved gate/up layout without an _apply_gate to read the activation from"
    return None


def _activation_fn(m):
    return m._apply_gate if m.has_gate else m.act_fn


@torch.compiler.assume_constant_result
def _spec_key(m, x_dtype: torch.dtype, top_k: int) -> str:
    """The layer's MoESpec as the op's string argument. Under dynamo this runs once at trace time and its
    result is a constant of the graph (building a spec is Python that dynamo need not trace)."""
    w1, w2, b1, b2 = _weights(m)
    spec = MoESpec(
        num_experts=w1.shape[0], top_k=top_k, hidden=w2.shape[1], intermediate=w2.shape[2],
        up_rows=w1.shape[1], activation=m._moefuse_activation, dtype=str(w1.dtype).removeprefix("torch."),
        out_dtype=str(x_dtype).removeprefix("torch."), w1_bias=b1 is not None, w2_bias=b2 is not None,
        router="transformers experts interface (via moefuse.convert)",
    )
    return spec.to_key()


def moefuse_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface, served by moefuse::moe: (x[T,H], ids[T,K], weights[T,K]) → y[T,H]."""
    if not hasattr(self, "_moefuse_activation"):
        raise RuntimeError(
            f"{type(self).__name__} is set to experts_implementation='moefuse' but was not prepared: "
            "call moefuse.convert(model) instead of set_experts_implementation('moefuse')"
        )
    w1, w2, b1, b2 = _weights(self)
    spec = _spec_key(self, hidden_states.dtype, top_k_index.shape[-1])
    return fused_moe(hidden_states.to(w1.dtype), top_k_index, top_k_weights, w1, w2, b1, b2, spec)


def _register_with_transformers() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION, moefuse_experts_forward)


def convert(model: torch.nn.Module) -> ConvertSummary:
    """Make every MoE experts module of `model` call `moefuse::moe`; return what was changed and what not.

    transformers models (experts built with `@use_experts_implementation`, whatever experts implementation
    they were loaded with) switch to transformers' experts interface entry "moefuse"; each module's
    activation is read once, from the graph dynamo captures of its own gate function. A module moefuse
    cannot serve exactly keeps its implementation and is listed with the reason.
    """
    summary = ConvertSummary()
    experts = [(name, m) for name, m in model.named_modules() if _is_interface_experts(m)]
    if not experts:
        return summary
    _register_with_transformers()
    for name, m in experts:
        why = _why_not(m)
        if why is None:
            w1 = m.gate_up_proj if m.has_gate else m.up_proj
            rows = w1.shape[2] if m.is_transposed else w1.shape[1]
            try:
                m._moefuse_activation = capture_activation(_activation_fn(m), rows)
            except Reject as r:
                why = f"{r.reason.value}: {r.detail}"
        if why is not None:
            summary.skipped[name] = why
            continue
        summary.converted.append(name)
    if summary.skipped and summary.converted:
        # transformers sets one implementation per config; mixing needs per-module configs, not done yet
        summary.converted, skipped = [], summary.converted
        for name in skipped:
            summary.skipped[name] = "left unconverted: other experts modules of this model cannot be converted"
        return summary
    if summary.converted:
        model.set_experts_implementation(IMPLEMENTATION)
        log.info("%s", summary)
    return summary
