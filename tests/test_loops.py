"""Per-expert loops that dynamo unrolls into the graph are lowered like any other MoE (`passes/loops.py`), with
eager's numbers: mistral-inference's `MoeLayer` (`torch.where(ids == e)`, `results[idx] += …`), a transformers
4.x Mixtral-style block (one-hot expert mask rows, `index_add_`) and a litgpt `LLaMAMoE`-style block (masks
from `ids == arange(E)`), all restated in tests/test_convert_structure.py. No `moefuse.convert`: the one-line
compile. Tolerances: fp32 1e-4 relative; bf16 within twice eager-bf16's own error against an fp32 reference,
plus one bf16 unit."""
from __future__ import annotations

import copy

import pytest
import torch

import moefuse
from moefuse.metrics import rel_err
from moefuse.runtime import op as moe_op
from test_convert_structure import build

pytestmark = pytest.mark.usefixtures("cpu_path")
LOOPS = ["mistral", "mixtral_4x", "litgpt"]
BF16_UNIT = 2.0 ** -8


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model, x, compiled):
    x = x.detach().clone().requires_grad_(True)
    backend = moefuse.Backend({"inner": "eager"})
    before = sum(moe_op.counters.values())
    torch._dynamo.reset()
    out = _first(torch.compile(model, backend=backend)(x) if compiled else model(x))
    calls = sum(moe_op.counters.values()) - before
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    grads = dict(zip(["x", *params], torch.autograd.grad((out.float() * probe).sum(), [x, *params.values()])))
    return out, grads, backend.explanation, calls


@pytest.mark.parametrize("name", LOOPS)
def test_loop_lowered_in_the_graph_with_eager_numbers(name):
    model, x = build(name)
    ref, ref_grads, _, _ = _run(model, x, compiled=False)
    out, grads, explanation, calls = _run(model, x, compiled=True)
    lowered = explanation.lowered
    assert len(lowered) == 2 and not explanation.rejected and calls >= 2, str(explanation)  # two blocks
    assert all(r.stacked_per_call and r.training and r.spec.w3 for r in lowered)
    assert "stacked for the op on every call" in str(explanation)
    assert rel_err(out, ref) <= 1e-4
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n


@pytest.mark.parametrize("name", LOOPS)
def test_loop_lowered_in_bf16_within_eager_error(name):
    reference, x = build(name)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        ref = _first(reference(x))
        eager = _first(model(x.bfloat16()))
        backend = moefuse.Backend({"inner": "eager"})
        out = _first(torch.compile(model, backend=backend)(x.bfloat16()))
    assert len(backend.explanation.lowered) == 2, str(backend.explanation)
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + BF16_UNIT
