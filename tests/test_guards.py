"""Compiled code is reused across token counts, recompiled when it must be, deterministic, and reads the
model's current weights."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.testing import assert_model_parity, fp32_twin, rel_err, tiny_model

pytestmark = pytest.mark.usefixtures("cpu_path")


def test_five_token_counts_compile_at_most_twice():
    """The first call specialises, the second marks the token count dynamic; after that no recompile (and the
    fused op takes any T: nothing in its spec depends on the token count)."""
    model = tiny_model("qwen3_moe")
    backend = Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    counters.clear()
    with torch.no_grad():
        for n in (5, 9, 13, 2, 31):
            ids = torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(n))
            assert rel_err(compiled(ids).logits, model(ids).logits) <= 1e-4
    assert counters["stats"]["unique_graphs"] <= 2
    assert len(backend.explanation.reports) <= 2
    assert all(len(r.lowered) == 2 for r in backend.explanation.reports)


def test_new_dtype_recompiles_correctly():
    model = tiny_model("mixtral")
    backend = Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        compiled(ids)
        model.to(torch.float16)
        out = compiled(ids).logits
        ref = model(ids).logits
        ref32 = fp32_twin(model)(ids).logits
    assert out.dtype == torch.float16
    assert_model_parity(out, ref, ref32, torch.float16)  # derived: within 3× eager's error vs the fp32 twin
    assert [r.lowered[0].spec.dtype for r in backend.explanation.reports] == ["float32", "float16"]


def test_deterministic_outputs_and_gradients():
    model = tiny_model("olmoe").train()
    compiled = torch.compile(model, backend=Backend({"inner": "eager"}))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))

    def run():
        model.zero_grad(set_to_none=True)
        out = compiled(ids).logits
        out.float().pow(2).mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

    (o1, g1), (o2, g2) = run(), run()
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_weights_loaded_after_compiling_are_used():
    """Expert weights are graph inputs, not constants: load_state_dict after compilation changes the output."""
    model = tiny_model("qwen3_moe", seed=0)
    other = tiny_model("qwen3_moe", seed=1)
    compiled = torch.compile(model, backend=Backend({"inner": "eager"}))
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        before = compiled(ids).logits
        model.load_state_dict(other.state_dict())
        calls = moe_op.counters["cpu"]
        after = compiled(ids).logits
        assert moe_op.counters["cpu"] - calls == 2  # still the fused op
        assert rel_err(after, other(ids).logits) <= 1e-4
        assert rel_err(after, before) > 1e-2


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_compiled_model_trains_through_the_triton_kernels_on_the_interpreter(monkeypatch, family):
    """Forward and backward of a compiled model on the Triton path (TRITON_INTERPRET=1): fused kernels both ways."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model(family).train()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def grads(m):
        model.zero_grad(set_to_none=True)
        m(ids).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.delenv("TRITON_INTERPRET")
    ref = grads(model)  # eager transformers (the op is not involved)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = dict(moe_op.counters)
    got = grads(torch.compile(model, backend=Backend({"inner": "eager"})))
    assert moe_op.counters["fwd_train_triton"] - before["fwd_train_triton"] == 2
    assert moe_op.counters["bwd_triton"] - before["bwd_triton"] == 2
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4
