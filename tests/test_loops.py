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


class _Cfg:
    def __init__(self, k):
        self.k = k


class _Mlp(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.inp = torch.nn.Linear(h, 2 * i, bias=False)
        self.out = torch.nn.Linear(i, h, bias=False)

    def forward(self, v):
        a, b = self.inp(v).chunk(2, dim=-1)
        return self.out(torch.nn.functional.gelu(a) * b)


class RenamedLoopMoE(torch.nn.Module):
    """Nothing named like a router, experts or top-k: a raw routing parameter, a ModuleDict of fused-GLU MLPs
    (`inp`, `out`), K only in `self.cfg.k`, sigmoid scores, `nonzero(as_tuple=True)` per expert and
    `index_put_(accumulate=True)` back (a spelling of its own, not from a codebase)."""

    def __init__(self, h=32, i=16, e=5, k=2):
        super().__init__()
        self.cfg = _Cfg(k)
        self.mix = torch.nn.Parameter(torch.randn(e, h) / h ** 0.5)
        self.ffns = torch.nn.ModuleDict({f"f{j}": _Mlp(h, i) for j in range(e)})

    def forward(self, x):
        scores, chosen = torch.sigmoid(x @ self.mix.t()).topk(self.cfg.k, dim=-1)
        out = x.new_zeros(x.shape)
        for j, f in enumerate(self.ffns.values()):
            rows, slot = torch.nonzero(chosen == j, as_tuple=True)
            out.index_put_((rows,), scores[rows, slot].unsqueeze(-1) * f(x[rows]), accumulate=True)
        return out


def test_renamed_loop_with_k_in_a_config_lowered_and_converted():
    """The same layer lowered in the graph with the one-line compile, and converted by moefuse.convert: both
    with eager's numbers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(RenamedLoopMoE())
    x = torch.randn(9, 32)
    ref, ref_grads, _, _ = _run(model, x, compiled=False)
    out, grads, explanation, _ = _run(model, x, compiled=True)
    assert len(explanation.lowered) == 1 and explanation.lowered[0].stacked_per_call, str(explanation)
    assert explanation.lowered[0].spec.top_k == 2
    assert rel_err(out, ref) <= 1e-4 and all(rel_err(grads[n], ref_grads[n]) <= 1e-4 for n in ref_grads)
    assert moefuse.convert(model).converted
    with torch.no_grad():
        converted = moefuse.explain(model, x)
        out = model(x)
    assert len(converted.lowered) == 1 and converted.lowered[0].by_convert, str(converted)
    assert rel_err(out, ref) <= 1e-4
