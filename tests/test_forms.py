"""Detection by meaning: MoE layers written as other codebases write them (tests/forms.py restates each with
its source named; mixture-of-experts is the package itself) are lowered with eager's numbers, forward and
every gradient, or rejected with a reason that is true.

Each lowering test asserts the rewrite fired (the report *and* the op's call counters) and compares with the
model run eagerly. Tolerances:
  - fp32: 1e-4 relative (the op accumulates in fp32 like eager; only the summation order differs);
  - bf16: moefuse's error against an fp32 reference of the same layer is at most twice eager-bf16's own error
    against that reference, plus one bf16 unit of the reference's scale (so a tensor eager happens to get
    exactly right still allows the op's own rounding). Derived from the dtype, not picked to pass.
"""
from __future__ import annotations

import copy

import pytest
import torch

import forms
import moefuse
from moefuse.metrics import rel_err
from moefuse.runtime import op as moe_op

pytestmark = pytest.mark.usefixtures("cpu_path")

BF16_UNIT = 2.0 ** -8  # bf16 keeps 8 significant bits: one unit of rounding, relative




def _compiled(model, x, train: bool):
    """(output, explanation, op calls): `model` compiled with moefuse (eager inner compiler) and run once."""
    backend = moefuse.Backend({"inner": "eager"})
    before = sum(moe_op.counters.values())
    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        out = torch.compile(model, backend=backend)(x)
    return out, backend.explanation, sum(moe_op.counters.values()) - before


def _grads(model, x, out, probe):
    """Gradients of ⟨out, probe⟩ with respect to x and every parameter, by name."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out.float() * probe).sum(), [x, *params.values()], allow_unused=True)
    return {"x": grads[0], **{n: g for n, g in zip(params, grads[1:]) if g is not None}}


def _forward_backward(model, x, compiled: bool):
    x = x.detach().clone().requires_grad_(True)
    if compiled:
        out, explanation, calls = _compiled(model, x, train=True)
    else:
        out, explanation, calls = model(x), None, 0
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, _grads(model, x, out, probe), explanation, calls


def _assert_lowered(explanation, calls, n=1):
    assert len(explanation.lowered) == n and not explanation.rejected, str(explanation)
    assert calls >= n, "the fused op never ran"


FP32_FORMS = [
    (forms.GptFastMoE, (12, 64)),  # gathered w[ids], einsum 'ti,taoi->tao', separate w1/w3
    (forms.GatheredBmmMoE, (12, 64)),  # gathered w13[ids] in × out, bmm, index_add_
    (forms.DenseMatmulMoE, (12, 64)),  # every expert on every token by matmul, dense [T, E] gate, einsum combine
    (forms.SortRoutedMoE, (2, 5, 32)),  # argsort-descending top-k, [B, S, D] tokens, 4-D einsum, split gate/up
]


@pytest.mark.parametrize("cls,shape", FP32_FORMS, ids=[c.__name__ for c, _ in FP32_FORMS])
def test_fp32_forward_and_gradients_equal_eager(cls, shape):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(*shape)
    ref, ref_grads, _, _ = _forward_backward(model, x, compiled=False)
    out, grads, explanation, calls = _forward_backward(model, x, compiled=True)
    _assert_lowered(explanation, calls)
    assert explanation.lowered[0].training
    assert rel_err(out, ref) <= 1e-4
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-4, name


def _bf16_pair(cls, **kw):
    """(bf16 model, fp32 reference with the same weights): the reference computes everything in fp32."""
    torch.manual_seed(0)
    ref = cls(**kw)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    if isinstance(ref, forms.TitanMoE):
        ref.expert_dtype = torch.float32  # its experts otherwise run in bf16 whatever the parameters' dtype
    return model, ref


BF16_FORMS = [
    (forms.TitanMoE, (2, 6, 64), {}),  # torchtitan: 3 grouped mms, argsort, scatter_add combine, shared expert
    (forms.TitanMoE, (2, 6, 64), dict(score="sigmoid", route_norm=False, route_scale=2.5, shared=False)),
    (forms.GptFastMoE, (12, 64), {}),
    (forms.ResearchGroupedMoE, (12, 64), {}),  # argsort + bincount + x[order // K] + F.grouped_mm, one graph
]


@pytest.mark.parametrize("cls,shape,kw", BF16_FORMS, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(BF16_FORMS)])
def test_bf16_forward_and_gradients_within_eager_error(cls, shape, kw):
    model, reference = _bf16_pair(cls, **kw)
    x = torch.randn(*shape)
    ref, ref_grads, _, _ = _forward_backward(reference, x, compiled=False)
    eager, eager_grads, _, _ = _forward_backward(model, x.bfloat16(), compiled=False)
    out, grads, explanation, calls = _forward_backward(model, x.bfloat16(), compiled=True)
    _assert_lowered(explanation, calls)
    if cls is forms.TitanMoE:  # its shared FeedForward (w1, w2, w3 linears) runs inside the op
        assert (explanation.lowered[0].spec.shared is not None) == kw.get("shared", True)
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + BF16_UNIT
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 2 * rel_err(eager_grads[name], ref_grads[name]) + BF16_UNIT, name


def test_titan_in_fp32_model_runs_bf16_experts_like_eager():
    """torchtitan casts x and the weights to bf16 inside its experts even in an fp32 model: the op computes in
    bf16 with an fp32 output, and its error stays within eager's (both against all-fp32 experts)."""
    torch.manual_seed(0)
    model = forms.TitanMoE()
    reference = copy.deepcopy(model)
    reference.expert_dtype = torch.float32
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        ref, eager = reference(x), model(x)
    out, explanation, calls = _compiled(model, x, train=False)
    _assert_lowered(explanation, calls)
    spec = explanation.lowered[0].spec
    assert (spec.dtype, spec.out_dtype, spec.w3) == ("bfloat16", "float32", True)
    assert spec.shared is None  # its fp32 shared FeedForward stays beside the bf16 op: one dtype inside the op
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + BF16_UNIT


def _assert_rejected_unchanged(model, x, reason):
    with torch.no_grad():
        ref = model(x)
        out, explanation, calls = _compiled(model, x, train=False)
    assert not explanation.lowered and calls == 0, str(explanation)
    assert reason in {r.reason.name for r in explanation.rejected}, str(explanation)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    return explanation


def test_capacity_dispatch_is_rejected_with_its_reason():
    """GShard-style capacity: pairs past an expert's capacity are dropped, which the op does not do."""
    torch.manual_seed(0)
    explanation = _assert_rejected_unchanged(forms.CapacityMoE(), torch.randn(16, 64), "CAPACITY")
    assert "cumsum" in str(explanation) and "dropped" in str(explanation)


def test_mixture_of_experts_package_is_rejected_with_its_reason():
    """lucidrains' mixture-of-experts 0.2.3 (its own classes): top-2 gating with a capacity and a random second
    policy; a data-dependent one_hot width breaks its graph, so the experts arrive in a graph of their own."""
    mixture_of_experts = pytest.importorskip("mixture_of_experts")
    torch.manual_seed(0)
    model = mixture_of_experts.MoE(dim=32, num_experts=4, hidden_dim=16).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        out, explanation, calls = _compiled(model, x, train=False)
    assert not explanation.lowered and calls == 0
    reasons = {r.reason.name: r for r in explanation.rejected}
    assert "CAPACITY" in reasons, str(explanation)
    assert "routing comes from outside" in str(reasons.get("NO_ROUTING_IDS", "")), str(explanation)
