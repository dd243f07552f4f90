"""The backend's surface: entry point, options, spec contract, rejections that leave the graph untouched,
and the hand-off of the rest of the graph to Inductor."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moefuse
from moefuse import Backend, MoESpec
from moefuse.compiler.options import Options, parse_options
from moefuse.errors import OptionsError
from moefuse.runtime import op as moe_op
from moefuse.spec import Activation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoE, SimpleMoEModel  # noqa: E402


# The op's CPU path unless a test sets TRITON_INTERPRET=1 itself; fresh dynamo caches (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_path")


def test_entry_point_registered():
    from torch._dynamo.backends.registry import lookup_backend

    assert "moefuse" in torch._dynamo.list_backends()
    assert lookup_backend("moefuse") is moefuse.compiler.backend.moefuse_backend


def test_options_validated():
    assert parse_options(None) == Options()
    assert parse_options({"inner": "eager", "verify": "0"}) == Options(inner="eager", verify=False)
    with pytest.raises(OptionsError, match=r"unknown moefuse option\(s\) \['innr'\]; valid options are \['inner'"):
        parse_options({"innr": "eager"})
    with pytest.raises(OptionsError, match=r"option 'inner' takes one of \['inductor', 'eager'\], got 'aot'"):
        parse_options({"inner": "aot"})


def test_options_from_environment(monkeypatch):
    monkeypatch.setenv("MOEFUSE_INNER", "eager")
    assert parse_options({}).inner == "eager"
    assert parse_options({"inner": "inductor"}).inner == "inductor"  # explicit wins
    monkeypatch.setenv("MOEFUSE_VERIFY", "maybe")
    with pytest.raises(OptionsError, match="MOEFUSE_VERIFY"):
        parse_options({})


def test_spec_round_trip_and_validation():
    spec = MoESpec(8, 2, 64, 32, 64, Activation("x0*x1*sigmoid(x0)", ((0, 1), (32, 1))), "float16", "float16")
    assert MoESpec.from_key(spec.to_key()) == spec and hash(MoESpec.from_key(spec.to_key())) == hash(spec)
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        MoESpec(8, 9, 64, 32, 64, spec.activation, "float16", "float16")
    with pytest.raises(ValueError, match="read row 64 of an up-projection with 64 rows"):
        MoESpec(8, 2, 64, 32, 64, Activation("x0*x1", ((1, 2), (33, 1))), "float16", "float16")
    with pytest.raises(ValueError, match="dtype='float64'"):
        MoESpec(8, 2, 64, 32, 64, spec.activation, "float64", "float16")


def _run(model, x, **options):
    backend = Backend({"inner": "eager", **options})
    calls = moe_op.counters["cpu"]
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    return out, backend.explanation, moe_op.counters["cpu"] - calls


class CumsumGLU(SimpleMoE):
    """An activation that is not elementwise (cumsum along the features) cannot go into an epilogue."""

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        h = torch.einsum("th,enh->ten", x, self.w1)
        gate, up = h.chunk(2, dim=-1)
        a = torch.cumsum(F.silu(gate), dim=-1) * up
        y = torch.einsum("ten,ehn->teh", a, self.w2)
        return (y * torch.zeros_like(probs).scatter(1, ids, weights).unsqueeze(-1)).sum(dim=1)


class Escapes(SimpleMoE):
    """The expert activations are returned too: replacing the region would have to keep them."""

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        h = torch.einsum("th,enh->ten", x, self.w1)
        a = F.gelu(h)
        y = torch.einsum("ten,ehn->teh", a, self.w2)
        return (y * torch.zeros_like(probs).scatter(1, ids, weights).unsqueeze(-1)).sum(dim=1), a.mean()


@pytest.mark.parametrize("cls,glu,reason", [(CumsumGLU, True, "UNSUPPORTED_ACTIVATION"),
                                            (Escapes, False, "INTERIOR_ESCAPES")])
def test_rejected_regions_run_unchanged(cls, glu, reason):
    torch.manual_seed(0)
    model = cls(32, 16, 4, 2, glu=glu)
    x = torch.randn(6, 32)
    with torch.no_grad():
        ref = model(x)
    out, explanation, calls = _run(model, x)
    assert [r.reason.name for r in explanation.rejected] == [reason], str(explanation)
    assert not explanation.lowered and calls == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_lower_false_reports_without_rewriting():
    torch.manual_seed(0)
    model = SimpleMoEModel(hidden=32, intermediate=16, num_experts=4, top_k=2)
    x = torch.randn(5, 32)
    out, explanation, calls = _run(model, x, lower=False)
    assert len(explanation.lowered) == 2 and calls == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_explain_reports_without_touching_the_model():
    torch.manual_seed(0)
    model = SimpleMoEModel(hidden=32, intermediate=16, num_experts=4, top_k=2)
    x = torch.randn(5, 32)
    with torch.no_grad():
        explanation = moefuse.explain(model, x)
    assert len(explanation.lowered) == 2 and "LOWERED  moes.0" in str(explanation)
    assert isinstance(model.moes[0], SimpleMoE)


@pytest.mark.slow
def test_inductor_compiles_the_rest_of_the_graph():
    """The default inner compiler: Inductor takes the graph around the fused op (C++ on the CPU)."""
    torch.manual_seed(0)
    model = SimpleMoEModel(hidden=32, intermediate=16, num_experts=4, top_k=2)
    x = torch.randn(7, 32)
    calls = moe_op.counters["cpu"]
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="moefuse")(x)
    report = moefuse.last_report()
    assert report.inner == "inductor" and len(report.lowered) == 2 and not report.rejected
    assert moe_op.counters["cpu"] - calls == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_identical_layers_are_verified_once(monkeypatch):
    from moefuse.compiler import verify as ver

    monkeypatch.setattr(ver, "_VERIFIED", {})
    probes = []
    real = ver._probe
    monkeypatch.setattr(ver, "_probe", lambda *a: probes.append(a) or real(*a))
    torch.manual_seed(0)
    model = SimpleMoEModel(hidden=32, intermediate=16, num_experts=4, top_k=2, layers=3)
    out, explanation, calls = _run(model, torch.randn(5, 32))
    assert len(explanation.lowered) == 3 and calls == 3
    assert len(probes) == 1  # three layers of one structure: one probe
    assert len({r.verify_error for r in explanation.lowered}) == 1
