"""moefuse.convert: experts that run in an eager loop (invisible to dynamo) get the fused op at module level."""
from __future__ import annotations

import pytest
import torch

import moefuse
from moefuse import Backend
from moefuse.convert import convert
from moefuse.runtime import op as moe_op
from moefuse.testing import rel_err, tiny_config


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
    from moefuse.convert import IMPLEMENTATION, _register_with_transformers

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
