"""moefuse.convert: experts that run in an eager loop (invisible to dynamo) get the fused op at module level."""
from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse import Backend
from moefuse.conversion import convert
from moefuse.runtime import op as moe_op
from moefuse.errors import MoefuseError
from moefuse.testing import (CONVERT_FAMILIES, assert_model_parity, fp32_twin, rel_err, tiny_config, tiny_model,
                             tiny_switch)


# The op's CPU path unless a test sets TRITON_INTERPRET=1 itself; fresh dynamo caches (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_path")


def eager_loop_model(family):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family), experts_implementation="eager").eval()


def test_eager_loop_is_reported_with_the_fix():
    model = eager_loop_model("qwen3_moe")
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        explanation = moefuse.explain(model, ids)
    assert not explanation.lowered
    assert "EXPERTS_OUTSIDE_GRAPH" in {r.reason.name for r in explanation.rejected}
    assert "moefuse.convert(model)" in str(explanation)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_convert_then_compile(family):
    model = eager_loop_model(family)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        summary = convert(model)
        assert len(summary.converted) == 2 and not summary.skipped, str(summary)
        calls = moe_op.counters["cpu"]
        eager_out = model(ids).logits  # converted, not compiled: the op runs eagerly
        assert moe_op.counters["cpu"] - calls == 2
        backend = Backend({"inner": "eager"})
        out = torch.compile(model, backend=backend)(ids).logits
    assert rel_err(eager_out, ref) <= 1e-4 and rel_err(out, ref) <= 1e-4
    lowered = backend.explanation.lowered
    assert len(lowered) == 2 and all(r.by_convert for r in lowered), str(backend.explanation)
    assert len(backend.explanation.reports) == 1  # no graph break left
    if family == "gpt_oss":
        assert lowered[0].spec.activation.slices == ((0, 2), (1, 2)) and lowered[0].spec.w1_bias


def test_convert_leaves_non_moe_models_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    summary = convert(model)
    assert not summary.converted and not summary.skipped


def test_unprepared_moefuse_implementation_is_a_clear_error():
    from moefuse.conversion import IMPLEMENTATION, _register_with_transformers

    model = eager_loop_model("olmoe")
    _register_with_transformers()
    model.set_experts_implementation(IMPLEMENTATION)
    with pytest.raises(RuntimeError, match=r"call moefuse.convert\(model\)"), torch.no_grad():
        model(torch.randint(0, 128, (1, 3)))


def test_converted_model_trains():
    """A converted eager-loop model's experts get gradients from the fused backward, equal to eager's."""
    model = eager_loop_model("mixtral").train()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    convert(model)
    before = moe_op.counters["bwd_cpu"]
    got = grads()
    assert moe_op.counters["bwd_cpu"] - before == 2
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4


# --------------------------------------------------------------------------------------------------------
# Module-level forms: FusedExperts swapped in for experts transformers does not offer through its interface
# --------------------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-4}  # fp32 relative error; fp16 by moefuse.testing.assert_model_parity (derived)


def convert_and_compile(model, *args, **kwargs):
    """(eager logits before convert, converted-eager logits, compiled logits, summary, explanation, op calls)."""
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
        summary = convert(model)
        calls = moe_op.counters["cpu"]
        converted = model(*args, **kwargs).logits
        eager_calls = moe_op.counters["cpu"] - calls
        backend = Backend({"inner": "eager"})
        out = torch.compile(model, backend=backend)(*args, **kwargs).logits
    return ref, converted, out, summary, backend.explanation, eager_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("family", sorted(CONVERT_FAMILIES))
def test_module_forms_convert_then_compile(family, dtype):
    """JetMoE (stacked per-expert linears split with tolist) and DBRX (2-D w1/v1/w2, eager loop): after convert
    each MoE layer is one fused op, eager or compiled, with eager's logits."""
    model = tiny_model(family, dtype)
    twin = fp32_twin(model) if dtype != torch.float32 else None  # before convert: the unconverted fp32 model
    # (with seed 0, fp16 DBRX's second router sees a near-tie that the first layer's rounding flips: a different
    # expert, not a different op; seed 2 has no such tie)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    ref, converted, out, summary, explanation, eager_calls = convert_and_compile(model, ids)
    assert len(summary.converted) == 2 and not summary.skipped, str(summary)
    assert eager_calls == 2
    lowered = explanation.lowered
    assert len(lowered) == 2 and all(r.by_convert for r in lowered), str(explanation)
    # JetMoE's attention is itself a mixture (MoA: top-k over attention experts, split with tolist), not fused
    assert {r.reason.name for r in explanation.rejected} <= {"EXPERTS_OUTSIDE_GRAPH"}, str(explanation)
    spec = lowered[0].spec
    assert (spec.num_experts, spec.top_k, spec.hidden, spec.intermediate) == (8, 2, 64, 32)
    assert (spec.activation.expr, spec.activation.slices) == ("x0*x1*sigmoid(x0)", ((0, 1), (32, 1)))
    with torch.no_grad():
        ref32 = twin(ids).logits if twin is not None else None
    assert_model_parity(converted, ref, ref32, dtype, TOL[torch.float32], what="converted")
    assert_model_parity(out, ref, ref32, dtype, TOL[torch.float32], what="compiled")


@pytest.mark.parametrize("family", sorted(CONVERT_FAMILIES))
def test_module_forms_train_as_eager(family):
    """Gradients through the converted experts (the fused backward) equal eager's, the router's included."""
    model = tiny_model(family).train()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    def grads(run):
        model.zero_grad(set_to_none=True)
        run(ids).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(model)
    convert(model)
    before = moe_op.counters["bwd_cpu"]
    got = grads(torch.compile(model, backend=Backend({"inner": "eager"})))
    assert moe_op.counters["bwd_cpu"] - before == 2
    # the experts' parameters were restacked: compare their gradients in the original layout
    for i in range(2):
        prefix = f"transformer.blocks.{i}.ffn" if family == "dbrx" else f"model.layers.{i}.mlp"
        w1, w2 = got.pop(f"{prefix}.experts.w1"), got.pop(f"{prefix}.experts.w2")
        if family == "dbrx":
            f = w2.shape[-1]
            got[f"{prefix}.experts.mlp.w1"] = w1[:, :f].reshape(-1, 64)
            got[f"{prefix}.experts.mlp.v1"] = w1[:, f:].reshape(-1, 64)
            got[f"{prefix}.experts.mlp.w2"] = w2.transpose(1, 2).reshape(-1, 64)
        else:
            got[f"{prefix}.input_linear.weight"], got[f"{prefix}.output_linear.weight"] = w1, w2
    assert got.keys() == ref.keys() and any("router" in n for n in ref)
    worst = max(ref, key=lambda n: rel_err(got[n], ref[n]))
    assert rel_err(got[worst], ref[worst]) <= 1e-4, worst


def test_switch_convert_then_compile():
    """Switch Transformers' ModuleDict of experts, top-1 with a capacity limit: tokens over capacity are dropped
    pairs (id −1) in the fused op, exactly as the loop leaves them out."""
    model = tiny_switch(expert_capacity=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    router = model.encoder.block[1].layer[1].mlp.router
    with torch.no_grad():
        mask, _, _ = router(model.encoder.embed_tokens(ids))  # [B, S, E] one-hot, zero rows over capacity
    assert (mask.sum(-1) == 0).any() and (mask.sum(-1) == 1).any()  # some tokens are dropped, some routed
    ref, converted, out, summary, explanation, eager_calls = convert_and_compile(
        model, input_ids=ids, decoder_input_ids=dec)
    assert summary.converted == ["encoder.block.1.layer.1.mlp.experts", "decoder.block.1.layer.2.mlp.experts"]
    assert eager_calls == 2 and len(explanation.lowered) == 2 and not explanation.rejected, str(explanation)
    spec = explanation.lowered[0].spec
    assert (spec.top_k, spec.activation.expr, spec.glu) == (1, "Max(0, x0)", False)
    assert rel_err(converted, ref) <= 1e-4 and rel_err(out, ref) <= 1e-4


def test_switch_dropout_refuses_training():
    """Switch's experts apply dropout in training, which the fused op does not: a clear error, not other numbers."""
    model = tiny_switch(dropout_rate=0.1)
    convert(model)
    model.train()
    with pytest.raises(MoefuseError, match="dropout"):
        model(input_ids=torch.randint(0, 128, (1, 4)), decoder_input_ids=torch.randint(0, 128, (1, 3)))


class UserGLU(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (torch.nn.Linear(h, i, bias=False), torch.nn.Linear(h, i, bias=False),
                                               torch.nn.Linear(i, h, bias=False))

    def forward(self, x):
        return self.w_down(torch.nn.functional.silu(self.w_gate(x)) * self.w_up(x))


class UserMLP(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(h, i), torch.nn.Linear(i, h)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class UserMoE(torch.nn.Module):
    """The MoE block people write by hand: a router Linear, a ModuleList of experts, a loop over the experts."""

    def __init__(self, expert, routing, h=32, i=16, e=4, k=2):
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.experts = torch.nn.ModuleList(expert(h, i) for _ in range(e))
        self.top_k, self.routing = k, routing

    def forward(self, x):
        b, s, h = x.shape
        x = x.reshape(-1, h)
        logits = self.router(x)
        if self.routing == "sigmoid":
            w, ids = torch.sigmoid(logits).topk(self.top_k, dim=-1)
        elif self.routing == "squared":  # a rule convert does not know: must be skipped, not guessed
            w, ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
            w = w * w
        else:
            w, ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
            if self.routing == "renorm":
                w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.view(b, s, h)


class UserModel(torch.nn.Module):
    def __init__(self, expert, routing):
        super().__init__()
        self.blocks = torch.nn.ModuleList(UserMoE(expert, routing) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("expert,routing,rule,act", [
    (UserGLU, "renorm", "softmax → top-k → renormalise", "x0*x1*sigmoid(x0)"),
    (UserMLP, "plain", "softmax → top-k", "x0*(erf(sqrt(2)*x0/2) + 1)/2"),
    (UserGLU, "sigmoid", "sigmoid → top-k", "x0*x1*sigmoid(x0)"),  # was skipped as unknown: now probed
], ids=["glu_renorm", "mlp_bias_gelu", "glu_sigmoid"])
def test_user_modulelist_moe_convert_then_compile(expert, routing, rule, act):
    torch.manual_seed(0)
    model = UserModel(expert, routing)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = model(x)
        summary = convert(model)
        assert summary.converted == ["blocks.0", "blocks.1"] and not summary.skipped, str(summary)
        assert model.blocks[0].router is not None and model.blocks[0].rule == rule
        backend = Backend({"inner": "eager"})
        before = moe_op.counters["cpu"]
        out = torch.compile(model, backend=backend)(x)
    assert moe_op.counters["cpu"] - before == 2
    lowered = backend.explanation.lowered
    assert len(lowered) == 2 and all(r.by_convert for r in lowered) and len(backend.explanation.reports) == 1
    assert lowered[0].spec.activation.expr == act and lowered[0].spec.w1_bias == (expert is UserMLP)
    assert rel_err(out, ref) <= 1e-4
    # the stacked weights are the model's parameters now: one set, trained by the fused backward
    assert sorted(n for n, _ in model.blocks[0].named_parameters()) == (
        ["experts.b1", "experts.b2", "experts.w1", "experts.w2", "router.weight"] if expert is UserMLP
        else ["experts.w1", "experts.w2", "router.weight"])
    model.train()
    model(x).pow(2).mean().backward()
    assert model.blocks[0].experts.w1.grad is not None and model.blocks[0].router.weight.grad is not None


def test_user_moe_with_unknown_routing_is_skipped():
    torch.manual_seed(0)
    model = UserModel(UserGLU, "squared")
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        ref = model(x)
        summary = convert(model)
        assert not summary.converted and set(summary.skipped) == {"blocks.0", "blocks.1"}
        assert "none of" in summary.skipped["blocks.0"]
        assert torch.equal(model(x), ref)  # untouched


class UserExpertsList(torch.nn.ModuleList):
    """A ModuleList of experts with transformers' experts call, experts(x, ids, weights): the loop inside."""

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out


class UserBlockCallingExperts(torch.nn.Module):
    def __init__(self, h=32, e=4):
        super().__init__()
        self.gate = torch.nn.Linear(h, e, bias=False)
        self.experts = UserExpertsList(UserGLU(h, 16) for _ in range(e))

    def forward(self, x):
        w, ids = torch.sigmoid(self.gate(x)).topk(2, dim=-1)  # any routing: it stays the block's own code
        return self.experts(x, ids, w)


def test_user_experts_container_with_forward_converted():
    torch.manual_seed(0)
    model = UserBlockCallingExperts()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
        summary = convert(model)
        assert summary.converted == ["experts"], str(summary)
        before = moe_op.counters["cpu"]
        out = model(x)
    assert moe_op.counters["cpu"] - before == 1 and rel_err(out, ref) <= 1e-4


# ------------------------------------------------------------------- bad input: all or nothing, true reasons

def _spoil(block: UserMoE, how: str) -> None:
    """Make one expert of `block` unlike the others (the first expert stays as it was)."""
    e = block.experts[2]
    if how == "width":  # expert 2 twice as wide
        e.w_gate, e.w_up, e.w_down = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False), \
            torch.nn.Linear(32, 32, bias=False)
    elif how == "bias":  # only expert 2 has a bias
        e.w_down = torch.nn.Linear(16, 32, bias=True)
    elif how == "dtype":
        e.double()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how, reason", [
    ("width", "expert 2's 'w_gate' maps 32→32, expert 0's maps 32→16: experts of unequal widths"),
    ("bias", "expert 2's 'w_down' has a bias, expert 0's has none"),
    ("dtype", "expert 2's 'w_gate' is in torch.float64, expert 0's weights in torch.float32"),
])
def test_unlike_experts_are_skipped_with_the_true_reason_and_nothing_changes(how, reason):
    """A good block then one with an odd expert: before, the good block was swapped and the second crashed
    (`stack expects each tensor to be equal size`, `expected Tensor as element 1`) or was skipped as
    'routing is none of …'. Now the odd block is skipped with its reason and the good one converted."""
    torch.manual_seed(0)
    model = UserModel(UserGLU, "renorm")
    _spoil(model.blocks[1], how)
    with torch.no_grad():
        summary = convert(model)
    assert summary.converted == ["blocks.0"], str(summary)
    assert reason in summary.skipped["blocks.1"], summary.skipped
    assert isinstance(model.blocks[1], UserMoE)


def test_convert_is_all_or_nothing_when_building_raises(monkeypatch):
    """An unexpected error while building the second replacement (a bug) leaves the first block in place too."""
    import moefuse.conversion as conversion

    torch.manual_seed(0)
    model = UserModel(UserGLU, "renorm")
    before = {n: m for n, m in model.named_modules()}
    real, calls = conversion._mlp_experts, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bug in the second build")
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "_mlp_experts", flaky)
    with pytest.raises(RuntimeError, match="bug in the second build"):
        convert(model)
    assert {n: m for n, m in model.named_modules()} == before  # the very same modules: nothing swapped


def test_transformers_model_mixing_convertible_and_not_changes_nothing(monkeypatch):
    """One experts module of a transformers model that cannot be served: none is switched, each says why."""
    import moefuse.conversion as conversion

    model = eager_loop_model("qwen3_moe")
    bad = model.model.layers[1].mlp.experts
    real = conversion.why_not
    monkeypatch.setattr(conversion, "why_not", lambda m: "made up for the test" if m is bad else real(m))
    summary = convert(model)
    assert not summary.converted and len(summary.skipped) == 2, str(summary)
    assert "made up for the test" in summary.skipped["model.layers.0.mlp.experts"]
    assert not any(hasattr(m, "_moefuse_activation") for m in model.modules())
    assert model.config._experts_implementation != "moefuse"


def test_convert_refuses_what_is_not_a_module():
    from moefuse.errors import ConversionError

    with pytest.raises(ConversionError, match="takes a torch.nn.Module, got OrderedDict"):
        convert(torch.nn.Linear(2, 2).state_dict())


def test_float64_input_is_named_as_the_input():
    """Before: 'expert weights in float64' (or a bare MoESpec ValueError) for weights that are float32."""
    from moefuse.errors import InputError

    torch.manual_seed(0)
    model = UserBlockCallingExperts()
    convert(model)
    with pytest.raises(InputError, match=r"input is in torch.float64.*cast the input"), torch.no_grad():
        model.experts(torch.randn(3, 32, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.long),
                      torch.ones(3, 2, dtype=torch.float64))


def test_options_given_as_a_string_are_an_options_error():
    from moefuse.compiler.options import parse_options
    from moefuse.errors import OptionsError

    with pytest.raises(OptionsError, match="options must be a dict"):
        parse_options("inner=eager")


class UserGLUGraphBreak(UserGLU):
    """An expert whose forward dynamo cannot capture in one graph: its activation cannot be read."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)


def test_expert_dynamo_cannot_capture_is_skipped_with_why():
    torch.manual_seed(0)
    model = UserModel(UserGLU, "renorm")
    model.blocks[1] = UserMoE(UserGLUGraphBreak, "renorm")
    with torch.no_grad():
        summary = convert(model)
    assert summary.converted == ["blocks.0"], str(summary)
    assert "dynamo cannot capture the experts' activation" in summary.skipped["blocks.1"], summary.skipped


@pytest.mark.parametrize("family", sorted(CONVERT_FAMILIES) + ["switch"])
def test_module_form_whose_replacement_differs_is_skipped(family, monkeypatch):
    """DBRX, JetMoE and Switch replacements are checked on a probe before any swap, like a user's blocks: a
    replacement that would compute something else (here: gate and up halves read the wrong way round, or an
    activation that is not the experts') is a skip with the reason, and the model is unchanged."""
    import moefuse.conversion as conversion

    if family == "switch":
        model = tiny_switch()
        real = conversion.capture_activation
        monkeypatch.setattr(conversion, "capture_activation",
                            lambda fn, rows: real(lambda up: torch.tanh(fn(up)), rows))
    else:
        model = tiny_model(family)
        monkeypatch.setattr(conversion, "_glu_of",
                            lambda act, width: lambda up: act(up[..., width:]) * up[..., :width])
    before = dict(model.named_modules())
    summary = convert(model)
    assert not summary.converted and len(summary.skipped) == 2, str(summary)
    assert all("on a random probe" in why for why in summary.skipped.values()), str(summary)
    assert dict(model.named_modules()) == before


@pytest.mark.parametrize("family", sorted(CONVERT_FAMILIES))
def test_module_forms_in_bfloat16_pass_their_probe(family):
    """The probe's tolerance is the dtype's: bf16 DBRX and JetMoE convert (a fixed 1e-2 skipped them all)."""
    summary = convert(tiny_model(family, torch.bfloat16))
    assert len(summary.converted) == 2 and not summary.skipped, str(summary)
