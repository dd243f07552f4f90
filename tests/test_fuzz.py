"""Never wrong: generated MoE layers, each either lowered with eager's numbers or left exactly as it was.

A hypothesis strategy draws plain-PyTorch MoE modules — experts E, top-k K, sizes, dtype, routing rule,
expert form (dense einsum over all experts, or per-pair gathered weights W[ids]), gate/up layout, biases,
an activation from a small grammar of elementwise ops, and a combine style — compiles each with moefuse
and checks: lowered ⇒ equal to eager within the dtype's tolerance; not lowered ⇒ a typed reason and the
same bits as eager. A lowered-but-wrong layer fails with the drawn configuration as its reproducer.

MOEFUSE_FUZZ_EXAMPLES (default 500: what CI runs) sets the number of layers drawn.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.testing import rel_err

pytestmark = pytest.mark.usefixtures("cpu_path")

EXAMPLES = int(os.environ.get("MOEFUSE_FUZZ_EXAMPLES", "500"))
# Relative error of a lowered layer: fp32 sums in another order (a few ulps); fp16: eager rounds each op.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
STATS: collections.Counter = collections.Counter()

# The activation grammar: unary elementwise ops, and ways to combine two of them.
UNARY = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "relu": F.relu, "softplus": F.softplus, "clamp": lambda x: x.clamp(-2.0, 3.0),
    "identity": lambda x: x, "relu2": lambda x: F.relu(x) ** 2, "mish": lambda x: x * torch.tanh(F.softplus(x)),
}
BINARY = {"mul": lambda a, b: a * b, "add": lambda a, b: a + b, "mul_plus1": lambda a, b: a * (b + 1.0)}


@dataclass(frozen=True)
class Layer:
    E: int
    K: int
    H: int
    I: int  # noqa: E741
    T: int
    dtype: str
    routing: str  # softmax_topk | softmax_topk_renorm | topk_softmax | sigmoid_topk_scaled
    form: str  # dense | gathered
    layout: str  # gate_up | up_gate | interleaved | plain
    bias: bool
    act: str  # unary name
    act2: str  # unary name applied to `up` in a GLU
    mix: str  # binary name combining act(gate) and act2(up)
    combine: str  # dense_scatter | pair_sum | index_add
    twist: str  # none | cumsum (a non-elementwise activation) | capacity (expert outputs masked inside the
    #             expert path) | escape (an expert activation also used outside the layer): each must be left
    #             alone | router_mask (weights below a threshold zeroed in the router: exact, may be lowered)


@st.composite
def layers(draw) -> Layer:
    e = draw(st.integers(1, 10))
    form = draw(st.sampled_from(["dense", "gathered"]))
    return Layer(
        E=e, K=draw(st.integers(1, min(e, 4))), H=draw(st.sampled_from([8, 16, 24])),
        I=draw(st.sampled_from([4, 8, 12])), T=draw(st.sampled_from([1, 2, 5, 13])),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        routing=draw(st.sampled_from(["softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk_scaled"])),
        form=form, layout=draw(st.sampled_from(["gate_up", "up_gate", "interleaved", "plain"])),
        bias=draw(st.booleans()) if form == "gathered" else False,
        act=draw(st.sampled_from(sorted(UNARY))), act2=draw(st.sampled_from(["identity", "identity", "sigmoid", "clamp"])),
        mix=draw(st.sampled_from(sorted(BINARY))),
        combine=draw(st.sampled_from(["dense_scatter"] if form == "dense" else ["pair_sum", "pair_sum", "index_add"])),
        twist=draw(st.sampled_from(["none"] * 5 + ["cumsum", "capacity", "escape", "router_mask"])),
    )


class GeneratedMoE(nn.Module):
    def __init__(self, c: Layer):
        super().__init__()
        self.c = c
        rows = c.I if c.layout == "plain" else 2 * c.I
        self.router = nn.Linear(c.H, c.E, bias=False)
        self.w1 = nn.Parameter(torch.randn(c.E, rows, c.H) * c.H**-0.5)
        self.w2 = nn.Parameter(torch.randn(c.E, c.H, c.I) * c.I**-0.5)
        self.b1 = nn.Parameter(torch.randn(c.E, rows) * 0.1) if c.bias else None
        self.b2 = nn.Parameter(torch.randn(c.E, c.H) * 0.1) if c.bias else None

    def route(self, x):
        c, logits = self.c, self.router(x)
        if c.routing == "topk_softmax":
            top, ids = logits.topk(c.K, dim=-1)
            return ids, top.softmax(dim=-1)
        if c.routing == "sigmoid_topk_scaled":
            w, ids = logits.sigmoid().topk(c.K, dim=-1)
            return ids, 2.5 * w / w.sum(dim=-1, keepdim=True)
        w, ids = logits.softmax(dim=-1).topk(c.K, dim=-1)
        if c.routing == "softmax_topk_renorm":
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w

    def activation(self, h):
        c = self.c
        if c.twist == "cumsum":
            h = h.cumsum(dim=-1)
        if c.layout == "plain":
            return UNARY[c.act](h)
        gate, up = {
            "gate_up": lambda: h.chunk(2, dim=-1),
            "up_gate": lambda: tuple(reversed(h.chunk(2, dim=-1))),
            "interleaved": lambda: (h[..., ::2], h[..., 1::2]),
        }[c.layout]()
        return BINARY[c.mix](UNARY[c.act](gate), UNARY[c.act2](up))

    def forward(self, x):
        c = self.c
        ids, w = self.route(x)
        if c.twist == "router_mask":  # part of the routing: the fused op gets the masked weights
            w = torch.where(w > 0.3, w, torch.zeros_like(w))
        if c.form == "dense":
            a = self.activation(torch.einsum("th,enh->ten", x, self.w1))
            y = torch.einsum("ten,ehn->teh", a, self.w2)
            if c.twist == "capacity":  # inside the expert path: must not be fused
                y = torch.where(y.abs() < 3.0, y, torch.zeros_like(y))
            out = (y * torch.zeros(x.shape[0], c.E, dtype=w.dtype).scatter(1, ids, w).unsqueeze(-1).to(y.dtype)).sum(1)
            return out + a.mean() if c.twist == "escape" else out
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(c.K, dim=0)
        h = torch.bmm(self.w1[flat], xs.unsqueeze(-1)).squeeze(-1)
        if self.b1 is not None:
            h = h + self.b1[flat]
        a = self.activation(h)
        o = torch.bmm(self.w2[flat], a.unsqueeze(-1)).squeeze(-1)
        if self.b2 is not None:
            o = o + self.b2[flat]
        if c.twist == "capacity":  # inside the expert path: must not be fused
            o = torch.where(o.abs() < 3.0, o, torch.zeros_like(o))
        o = o * w.reshape(-1, 1).to(o.dtype)
        if c.combine == "index_add":
            token = torch.arange(x.shape[0]).repeat_interleave(c.K)
            out = torch.zeros_like(x).index_add(0, token, o)
        else:
            out = o.view(x.shape[0], c.K, c.H).sum(dim=1)
        return out + a.mean() if c.twist == "escape" else out


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layers(), st.integers(0, 2**16))
def test_generated_layer_is_lowered_exactly_or_left_alone(c: Layer, seed: int):
    torch.manual_seed(seed)
    dtype = getattr(torch, c.dtype)
    model = GeneratedMoE(c).to(dtype)
    x = torch.randn(c.T, c.H, dtype=dtype)
    torch._dynamo.reset()
    backend = Backend({"inner": "eager"})
    calls = moe_op.counters["cpu"]
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend)(x)
    lowered, rejected = backend.explanation.lowered, backend.explanation.rejected
    ran = moe_op.counters["cpu"] - calls
    if lowered:
        STATS[f"{c.twist}: lowered"] += 1
        assert len(lowered) == 1 and ran == 1, f"reproducer: {c} seed={seed}\n{backend.explanation}"
        err = rel_err(out, ref)
        assert err <= TOL[dtype], f"lowered but wrong (rel. err {err:.3g}); reproducer: {c} seed={seed}\n{backend.explanation}"
    else:
        STATS[f"{c.twist}: " + (",".join(sorted({r.reason.name for r in rejected})) or "no candidate")] += 1
        assert ran == 0
        assert torch.equal(out, ref), f"left alone but changed; reproducer: {c} seed={seed}"


def summary() -> str | None:
    """The outcome counts, printed at the end of the run by tests/conftest.py."""
    if not STATS:
        return None
    return f"fuzz: {sum(STATS.values())} generated layers (twist: outcome × count): " + ", ".join(
        f"{k} × {v}" for k, v in sorted(STATS.items()))
