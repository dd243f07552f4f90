"""Tier 1: the backend on real dynamo graphs of tiny transformers models and a hand-written MoE.

Every test asserts that the rewrite fired (one lowered region per MoE layer, the fused op called) *and*
that the output matches eager.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.testing import FAMILIES, assert_model_parity, fp32_twin, num_moe_layers, rel_err, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoEModel  # noqa: E402

# Relative error of the logits, max|compiled - eager| / max|eager|, in fp32: the fused op reorders sums
# (combine in a different order, activation in fp32), a few ulps through two layers. fp16/bf16: derived, not
# tabled — moefuse's error within a small multiple of eager's, both against the same model in fp32
# (`moefuse.testing.assert_model_parity`).
TOL = {torch.float32: 1e-4}


def assert_logits(out, model, args, dtype, eager=None):
    """out (the compiled model's) against eager's, and for fp16 / bf16 against the fp32 twin's."""
    with torch.no_grad():
        eager = model(*args) if eager is None else eager
        wide = [a.float() if a.is_floating_point() else a for a in args]  # token ids stay ids
        ref32 = fp32_twin(model)(*wide) if dtype != torch.float32 else None
    def pick(o):
        return getattr(o, "logits", o)

    assert_model_parity(pick(out), pick(eager), None if ref32 is None else pick(ref32), dtype, TOL[torch.float32])


# What detection must read off each family's experts: (activation, slices of the up-projection, biases).
SWIGLU_GATE_UP = ("x0*x1*sigmoid(x0)", ((0, 1), (32, 1)), False)
EXPECTED_EXPERTS = {
    # interleaved [gate0, up0, gate1, …] (step 2), biases, and GPT-OSS's own clamped GLU with α = 1.702
    "gpt_oss": ("(Min(7, Max(-7, x1)) + 1)*sigmoid(851*Min(7, x0)/500)*Min(7, x0)", ((0, 2), (1, 2)), True),
}
EXPECTED_TOP_K = {"llama4": 1}  # every other family routes each token to 2 of 8 experts


# The op's CPU path unless a test sets TRITON_INTERPRET=1 itself; fresh dynamo caches (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_path")


def compile_and_run(model, *args, **options):
    backend = Backend({"inner": "eager", **options})
    before = dict(moe_op.counters)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args)
    calls = {k: moe_op.counters[k] - before[k] for k in before}
    return out, backend.explanation, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_model_every_moe_layer_lowered(family, dtype):
    model = tiny_model(family, dtype)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert not explanation.rejected, str(explanation)
    assert len(explanation.lowered) == num_moe_layers(model) == 2, str(explanation)
    assert calls["cpu"] == 2
    spec = explanation.lowered[0].spec
    assert (spec.num_experts, spec.top_k, spec.hidden, spec.dtype) == (8, EXPECTED_TOP_K.get(family, 2), 64, str(dtype)[6:])
    assert spec.weight_on_input == (family == "llama4")  # read from the graph: where the weights multiply
    expr, slices, biases = EXPECTED_EXPERTS.get(family, SWIGLU_GATE_UP)
    assert (spec.activation.expr, spec.activation.slices, spec.w1_bias and spec.w2_bias) == (expr, slices, biases)
    assert_logits(out, model, (ids,), dtype, eager=ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_handwritten_dense_moe_lowered(dtype):
    torch.manual_seed(0)
    model = SimpleMoEModel().to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    out, explanation, calls = compile_and_run(model, x)
    assert not explanation.rejected, str(explanation)
    assert len(explanation.lowered) == 2 and calls["cpu"] == 2, str(explanation)
    assert [r.module for r in explanation.lowered] == ["moes.0", "moes.1"]
    assert_logits(out, model, (x,), dtype, eager=ref)


def test_verification_rejects_a_wrong_detection(monkeypatch):
    """If detection ever misreads a layer (here: forced to swap gate and up), the probe must reject it."""
    from moefuse.passes import assemble as det

    real = det.activation_between

    def swapped(up, down_in):
        act, i = real(up, down_in)
        return type(act)(act.expr, tuple(reversed(act.slices))), i

    monkeypatch.setattr(det, "activation_between", swapped)
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert {r.reason.name for r in explanation.rejected} == {"VERIFY_MISMATCH"}
    assert not explanation.lowered and calls["cpu"] == 0
    assert torch.equal(out.logits, ref)


def test_report_is_readable():
    model = tiny_model("olmoe")
    ids = torch.randint(0, 128, (1, 4))
    _, explanation, _ = compile_and_run(model, ids)
    text = str(explanation)
    assert "2 MoE layer(s) lowered" in text and "model.layers.0.mlp" in text and "E=8 K=2 H=64" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_compiled_model_runs_the_triton_kernels_on_the_interpreter(monkeypatch, dtype):
    """End to end through the kernels: with TRITON_INTERPRET=1 the op runs the generated Triton kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model("qwen3_moe", dtype)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert len(explanation.lowered) == 2 and (calls["triton"], calls["cpu"]) == (2, 0), str(explanation)
    assert any("generated at" in k for k in explanation.lowered[0].kernels)
    assert_logits(out, model, (ids,), dtype, eager=ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_batched_mm_experts_lowered(family):
    """experts_implementation="batched_mm": each pair multiplies its own gathered weight, W[ids] @ x."""
    import transformers

    from moefuse.testing import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), experts_implementation="batched_mm").eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert not explanation.rejected and len(explanation.lowered) == 2 and calls["cpu"] == 2, str(explanation)
    expr, slices, biases = EXPECTED_EXPERTS.get(family, SWIGLU_GATE_UP)
    assert explanation.lowered[0].spec.activation.slices == slices
    assert rel_err(out.logits, ref) <= TOL[torch.float32]


def mish_gate(x):
    return x * torch.tanh(torch.nn.functional.softplus(x))


@pytest.mark.parametrize("glu,activation,expected", [
    (False, torch.nn.functional.gelu, "x0*(erf(sqrt(2)*x0/2) + 1)/2"),  # non-GLU expert, exact gelu
    (True, mish_gate, None),  # an activation no model uses: the epilogue is generated from the graph
    (True, lambda g: torch.nn.functional.gelu(g, approximate="tanh"), None),  # GeGLU
], ids=["gelu", "mish_gate_glu", "geglu"])
def test_handwritten_activations_lowered(glu, activation, expected):
    from simple_moe import SimpleMoE

    torch.manual_seed(0)
    model = SimpleMoE(32, 16, 4, 2, glu=glu, activation=activation)
    x = torch.randn(11, 32)
    with torch.no_grad():
        ref = model(x)
    out, explanation, calls = compile_and_run(model, x)
    assert len(explanation.lowered) == 1 and calls["cpu"] == 1, str(explanation)
    spec = explanation.lowered[0].spec
    assert spec.glu == glu and (expected is None or spec.activation.expr == expected)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_mish_gate_runs_generated_triton_epilogue(monkeypatch):
    """The novel activation through the Triton kernels (interpreter): generated epilogue, same numbers."""
    from simple_moe import SimpleMoE

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = SimpleMoE(32, 16, 4, 2, activation=mish_gate)
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
    out, explanation, calls = compile_and_run(model, x)
    assert len(explanation.lowered) == 1 and calls["triton"] == 1, str(explanation)
    assert "tanh" in explanation.lowered[0].spec.activation.expr
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_llama4_weights_on_input_train_as_eager():
    """Llama4 compiled under grad: the fused forward and backward run, and every gradient — the router's, which
    reaches it through the input scaling the rewrite emits in the graph, included — matches eager's."""
    model = tiny_model("llama4").train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(m):
        model.zero_grad(set_to_none=True)
        m(ids).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(model)
    backend = Backend({"inner": "eager"})
    before = dict(moe_op.counters)
    got = grads(torch.compile(model, backend=backend))
    ran = {k: moe_op.counters[k] - before[k] for k in ("fwd_train_cpu", "bwd_cpu")}
    assert len(backend.explanation.lowered) == 2 and ran == {"fwd_train_cpu": 2, "bwd_cpu": 2}, str(backend.explanation)
    assert got.keys() == ref.keys() and any("router" in n for n in ref) and any("experts" in n for n in ref)
    worst = max(ref, key=lambda n: rel_err(got[n], ref[n]))
    assert rel_err(got[worst], ref[worst]) <= 1e-4, worst


def test_llama4_top2_weights_on_input_rejected():
    """Σ_k expert(w_k·x) with K = 2 is not one fused call: the layer runs unchanged, with a typed reason."""
    model = tiny_model("llama4", num_experts_per_tok=2)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert not explanation.lowered and calls["cpu"] == 0
    assert [r.reason.name for r in explanation.rejected] == ["INPUT_WEIGHTING"] * 2, str(explanation)
    assert "top-k = 2" in str(explanation)
    assert torch.equal(out.logits, ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_top1_grouped_mm_lowered(family):
    # With K = 1, grouped_mm's expert-sorted weights `w.reshape(-1)[perm].unsqueeze(-1)` are [T·K, 1] = [T, K]:
    # detection must still take the routing weights from before the sort (they were rejected as EXTERNAL_INPUT).
    top1 = {"num_experts_per_tok": 1}
    model = tiny_model(family, **top1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    out, explanation, calls = compile_and_run(model, ids)
    assert not explanation.rejected and len(explanation.lowered) == 2 and calls["cpu"] == 2, str(explanation)
    assert explanation.lowered[0].spec.top_k == 1
    assert rel_err(out.logits, ref) <= TOL[torch.float32]
