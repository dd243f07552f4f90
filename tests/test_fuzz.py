"""Never wrong: generated MoE layers, each either lowered with eager's numbers or left exactly as it was.

A hypothesis strategy draws plain-PyTorch MoE modules — experts E (1…64), top-k K (1…min(E, 8)), sizes, dtype,
a routing rule (softmax → top-k, top-k → softmax, sigmoid, sigmoid with a selection-only correction bias,
DeepSeek-V3's group-limited top-k; each ± renormalisation, ± a routed scaling factor), an expert form (dense
einsum over all experts, per-pair gathered weights W[ids], or transformers' grouped_mm: sort by expert → gather
→ grouped mm on offsets → act → grouped mm → weighted unpermute), weights stored [E, out, in] or transposed,
gate/up layout, biases, an activation from a small grammar of elementwise ops, a combine style, and a shared
expert beside the routed ones (none, plain, or sigmoid-gated as in Qwen2-MoE) — compiles each with moefuse and
checks: lowered ⇒ equal to eager within the dtype's tolerance; not lowered ⇒ a typed reason and the same bits
as eager. Some fp32 layers also run backward: lowered ⇒ the gradients of x and of every parameter match eager's;
not lowered ⇒ they are eager's, bit for bit. A lowered-but-wrong layer fails with the drawn `Layer` and seed as
its reproducer (hypothesis shrinks it first).

A share of the layers (one seed in INTERPRETER_EVERY) runs with TRITON_INTERPRET=1: verification, the forward
and the backward then go through the Triton kernels on the interpreter rather than the CPU plan. And the fuzz
cannot pass by lowering nothing: `test_lowered_fraction_per_form` asserts a minimum lowered fraction for each
expert form (and through the interpreter) over the run.

MOEFUSE_FUZZ_EXAMPLES (default 500: what CI runs) sets the number of layers drawn.
"""
from __future__ import annotations

import collections
import contextlib
import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.integrations.moe import _grouped_linear  # what transformers' grouped_mm experts call

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.testing import assert_parity, fp32_twin, rel_err

pytestmark = pytest.mark.usefixtures("cpu_path")

EXAMPLES = int(os.environ.get("MOEFUSE_FUZZ_EXAMPLES", "500"))
# Relative error of a lowered fp32 layer: sums in another order (a few ulps). fp16: derived, not tabled —
# within a small multiple of eager's error, both against the layer's fp32 twin (`moefuse.testing.assert_parity`).
TOL = {torch.float32: 2e-5}
# About one layer in this many runs under TRITON_INTERPRET=1 (the Triton kernels on the interpreter: seconds a
# layer, so a share, not all); picked by a hash of the layer and seed, as hypothesis draws small seeds often.
INTERPRETER_EVERY = 10
# The least fraction of the drawn layers of each expert form that must be lowered over a run (and of the
# interpreter's share): measured over CI's 500 layers dense 0.78, gathered 0.64, grouped_mm 0.58, the
# interpreter's share (52 layers) 0.54 — the twists (cumsum, capacity, escape: each must be left alone, ~30% of
# the layers) and legitimate rejections take the rest. About half the lowest: a detection that silently stopped lowering
# a form fails here instead of passing vacuously.
MIN_LOWERED = {"dense": 0.25, "gathered": 0.25, "grouped_mm": 0.25, "interpreter": 0.2}
# Gradients, fp32 only: eager's fp16 backward rounds every intermediate to fp16 where the fused op accumulates in
# fp32, a gap of ~1e-2 that would hide a wrong gradient of the size fp32 pins down. A weight's gradient sums T·K
# outer products in another order than eager's, and the router's comes through the routing weights' gradient
# (a dot product of dy with each expert's output): a few ulps more than the forward's 2e-5.
GRAD_TOL = 1e-4
# Each gradient's error is taken relative to its own largest value, but never to less than this fraction of the
# layer's largest gradient: a gradient that is zero up to rounding (the router's when renormalised top-1 weights
# are identically 1: eager gives ~3e-7 of cancellation noise, the fused op 0) has no digits to compare.
GRAD_FLOOR = 1e-2
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

# The activation grammar: unary elementwise ops, and ways to combine two of them.
UNARY = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "relu": F.relu, "softplus": F.softplus, "clamp": lambda x: x.clamp(-2.0, 3.0),
    "identity": lambda x: x, "relu2": lambda x: F.relu(x) ** 2, "mish": lambda x: x * torch.tanh(F.softplus(x)),
}
BINARY = {"mul": lambda a, b: a * b, "add": lambda a, b: a + b, "mul_plus1": lambda a, b: a * (b + 1.0)}
ROUTINGS = ["softmax_topk", "topk_softmax", "sigmoid_topk", "sigmoid_bias", "grouped"]
# Spellings per form, as different codebases write the same step (detection must read them by meaning):
#   dense:      the einsum's index order, or matmul on an [E, T, ·] broadcast;
#   gathered:   the per-pair product by bmm, einsum or matmul of W[ids];
#   grouped_mm: the sort (sort / argsort / stable argsort), the counts (histc / scatter_add / one-hot sum /
#               a boolean routing map) and the un-permute (inverse permutation / index assignment / index_copy).
#               (bincount's data-dependent length breaks transformers' grouped-linear fallback, which this form
#               uses in fp32/fp16; tests/test_spellings.py runs it with torch._grouped_mm.)
SPELLINGS = {
    "dense": ["default", "expert_major", "matmul"],
    "gathered": ["default", "einsum", "matmul"],
    "grouped_mm": ["default", "argsort+scatter_add+setitem", "argsort_stable+one_hot+index_copy",
                   "sort+routing_map+setitem"],
}
COMBINES = {"dense": ["dense_scatter"], "gathered": ["pair_sum", "pair_sum", "index_add"],
            "grouped_mm": ["unpermute_sum", "unpermute_sum", "index_add"]}


@dataclass(frozen=True)
class Layer:
    E: int
    K: int
    H: int
    I: int  # noqa: E741
    T: int
    dtype: str
    routing: str  # softmax_topk | topk_softmax | sigmoid_topk | sigmoid_bias (a correction bias added to the
    #               scores for the choice only, weights from the unbiased sigmoid: DeepSeek-V3) | grouped
    #               (sigmoid_bias, top-k within the topk_group best of n_group expert groups: DeepSeek-V3)
    n_group: int  # grouped routing only (else 1)
    topk_group: int
    renorm: bool  # top-k weights divided by their sum
    scale: float  # routed scaling factor applied to the weights
    form: str  # dense | gathered | grouped_mm
    transposed: bool  # expert weights stored [E, in, out] rather than [E, out, in]
    layout: str  # gate_up | up_gate | interleaved | plain
    bias: bool
    act: str  # unary name
    act2: str  # unary name applied to `up` in a GLU
    mix: str  # binary name combining act(gate) and act2(up)
    combine: str  # dense_scatter | pair_sum | index_add | unpermute_sum
    shared: str  # none | plain (an ungated GLU MLP added to the routed output) | gated (× sigmoid(x·g): Qwen2-MoE)
    shared_I: int
    twist: str  # none | cumsum (a non-elementwise activation) | capacity (expert outputs masked inside the
    #             expert path) | escape (an expert activation also used outside the layer): each must be left
    #             alone | router_mask (weights below a threshold zeroed in the router: exact, may be lowered)
    grad: bool  # also run backward and compare every gradient (fp32 layers only)
    # How the code spells its steps (each the same function): see SPELLINGS, drawn per form
    spelling: str = "default"
    separate: bool = False  # gate and up held as two expert weights (w1, w3) rather than one [gate; up]


@st.composite
def layers(draw) -> Layer:
    e = draw(st.one_of(st.integers(1, 10), st.integers(11, 64)))
    # group-limited routing needs n_group ≥ 2 groups of ≥ 2 experts (a group scores by its best two)
    groups = [g for g in range(2, e // 2 + 1) if e % g == 0]
    routing = draw(st.sampled_from(ROUTINGS if groups else ROUTINGS[:-1]))
    n_group = draw(st.sampled_from(groups)) if routing == "grouped" else 1
    topk_group = draw(st.integers(1, n_group)) if routing == "grouped" else 1
    k = draw(st.sampled_from(range(1, min(8, topk_group * e // n_group) + 1)))  # integers() favours K = 1
    dtype = draw(st.sampled_from(["float32", "float16"]))
    form = draw(st.sampled_from(["dense", "gathered", "grouped_mm"]))
    shared = draw(st.sampled_from(["none", "none", "plain", "gated"]))
    # eager F.grouped_mm on the CPU wants 16-byte strides: I a multiple of 8 (fp16) in that form
    sizes_i = [8, 16] if form == "grouped_mm" else [4, 8, 12]
    return Layer(
        E=e, K=k, H=draw(st.sampled_from([8, 16, 24])), I=draw(st.sampled_from(sizes_i)),
        T=draw(st.sampled_from([1, 2, 5, 13])), dtype=dtype, routing=routing, n_group=n_group,
        topk_group=topk_group, renorm=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5])), form=form,
        transposed=draw(st.booleans()), layout=draw(st.sampled_from(["gate_up", "up_gate", "interleaved", "plain"])),
        bias=draw(st.booleans()) if form != "dense" else False,
        act=draw(st.sampled_from(sorted(UNARY))),
        act2=draw(st.sampled_from(["identity", "identity", "sigmoid", "clamp"])),
        mix=draw(st.sampled_from(sorted(BINARY))), combine=draw(st.sampled_from(COMBINES[form])),
        shared=shared, shared_I=draw(st.sampled_from([4, 12])) if shared != "none" else 0,
        twist=draw(st.sampled_from(["none"] * 5 + ["cumsum", "capacity", "escape", "router_mask"])),
        grad=draw(st.booleans()) if dtype == "float32" else False,  # about one layer in four
        spelling=draw(st.sampled_from(SPELLINGS[form])), separate=draw(st.booleans()),
    )


def split(c: Layer) -> bool:
    """Gate and up as two weights: a GLU stored [gate; up] or [up; gate] without biases or a cumsum twist."""
    return c.separate and c.layout in ("gate_up", "up_gate") and not c.bias and c.twist != "cumsum"


class GeneratedMoE(nn.Module):
    def __init__(self, c: Layer):
        super().__init__()
        self.c = c
        rows = c.I if c.layout == "plain" else 2 * c.I
        self.router = nn.Linear(c.H, c.E, bias=False)
        w1, w2 = torch.randn(c.E, rows, c.H) * c.H**-0.5, torch.randn(c.E, c.H, c.I) * c.I**-0.5
        self.w1 = nn.Parameter(w1.transpose(1, 2).contiguous() if c.transposed else w1)
        self.w2 = nn.Parameter(w2.transpose(1, 2).contiguous() if c.transposed else w2)
        if self.split:  # gate in w1, up in w3, each [E, I, H] (or transposed)
            self.w1 = nn.Parameter(self.w1.data.chunk(2, dim=2 if c.transposed else 1)[0].contiguous())
            self.w3 = nn.Parameter(w1.chunk(2, dim=1)[1].transpose(1, 2).contiguous() if c.transposed
                                   else w1.chunk(2, dim=1)[1].contiguous())
        self.b1 = nn.Parameter(torch.randn(c.E, rows) * 0.1) if c.bias else None
        self.b2 = nn.Parameter(torch.randn(c.E, c.H) * 0.1) if c.bias else None
        # sizeable next to sigmoid scores' spread, so the biased choice differs from the unbiased one
        self.register_buffer("correction", torch.randn(c.E) * 0.2 if c.routing in ("sigmoid_bias", "grouped") else None)
        if c.shared != "none":
            self.shared_gate_proj = nn.Linear(c.H, c.shared_I, bias=False)
            self.shared_up_proj = nn.Linear(c.H, c.shared_I, bias=False)
            self.shared_down_proj = nn.Linear(c.shared_I, c.H, bias=False)
            self.shared_expert_gate = nn.Linear(c.H, 1, bias=False) if c.shared == "gated" else None

    def route(self, x):
        c, logits = self.c, self.router(x)
        if c.routing == "topk_softmax":
            top, ids = logits.topk(c.K, dim=-1)
            w = top.softmax(dim=-1)
        elif c.routing == "softmax_topk":
            w, ids = logits.softmax(dim=-1).topk(c.K, dim=-1)
        elif c.routing == "sigmoid_topk":
            w, ids = logits.sigmoid().topk(c.K, dim=-1)
        else:  # the correction bias picks the experts; the weights are the unbiased sigmoid scores
            scores = logits.sigmoid()
            choice = scores + self.correction
            if c.routing == "grouped":
                size = c.E // c.n_group
                best = choice.view(-1, c.n_group, size).topk(2, dim=-1)[0].sum(dim=-1)
                kept = torch.zeros_like(best).scatter_(1, best.topk(c.topk_group, dim=-1)[1], 1)
                mask = kept.unsqueeze(-1).expand(-1, c.n_group, size).reshape(-1, c.E)
                choice = choice.masked_fill(~mask.bool(), float("-inf"))
            ids = choice.topk(c.K, dim=-1)[1]
            w = scores.gather(1, ids)
        if c.renorm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * c.scale if c.scale != 1.0 else w

    @property
    def split(self) -> bool:
        return split(self.c)

    def up(self, project):
        """The activation of the up projection(s): `project(weight, bias)` computes one up product."""
        c = self.c
        if not self.split:
            return self.activation(project(self.w1, self.b1))
        gate, up = project(self.w1, None), project(self.w3, None)
        return BINARY[c.mix](UNARY[c.act](gate), UNARY[c.act2](up))

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

    def capacity(self, o):
        # inside the expert path: must not be fused
        return torch.where(o.abs() < 3.0, o, torch.zeros_like(o)) if self.c.twist == "capacity" else o

    def forward(self, x):
        c = self.c
        ids, w = self.route(x)
        if c.twist == "router_mask":  # part of the routing: the fused op gets the masked weights
            w = torch.where(w > 0.3, w, torch.zeros_like(w))
        out, a = {"dense": self.dense, "gathered": self.gathered, "grouped_mm": self.grouped}[c.form](x, ids, w)
        if c.shared != "none":
            s = self.shared_down_proj(F.silu(self.shared_gate_proj(x)) * self.shared_up_proj(x))
            out = out + (F.sigmoid(self.shared_expert_gate(x)) * s if c.shared == "gated" else s)
        return out + a.mean() if c.twist == "escape" else out

    def dense(self, x, ids, w):
        """Every expert on every token (einsum over [E, ·, ·] weights); the weights scattered to [T, E] combine."""
        c = self.c
        dense_w = torch.zeros(x.shape[0], c.E, dtype=w.dtype).scatter(1, ids, w)
        if c.spelling == "default":
            up, down = ("th,ehn->ten", "ten,enh->teh") if c.transposed else ("th,enh->ten", "ten,ehn->teh")
            a = self.up(lambda weight, _: torch.einsum(up, x, weight))
            y = self.capacity(torch.einsum(down, a, self.w2))
            return (y * dense_w.unsqueeze(-1).to(y.dtype)).sum(1), a
        if c.spelling == "expert_major":  # [E, T, ·] outputs, weights named first
            up, down = ("ehn,th->etn", "enh,etn->eth") if c.transposed else ("enh,th->etn", "ehn,etn->eth")
            a = self.up(lambda weight, _: torch.einsum(up, weight, x))
            y = self.capacity(torch.einsum(down, self.w2, a))
        else:  # matmul on an [E, T, H] broadcast of the tokens
            def t(weight):  # [E, in, out]
                return weight if c.transposed else weight.transpose(1, 2)

            a = self.up(lambda weight, _: torch.matmul(x.unsqueeze(0), t(weight)))
            y = self.capacity(torch.matmul(a, t(self.w2)))
        return torch.einsum("eth,te->th", y, dense_w.to(y.dtype)), a

    def gathered(self, x, ids, w):
        """transformers' batched_mm: each (token, expert) pair multiplies its own gathered W[ids] (bmm)."""
        c, flat = self.c, ids.reshape(-1)

        def linear(v, weight, bias):
            g = weight[flat]
            if c.spelling == "einsum":
                o = torch.einsum("si,sio->so" if c.transposed else "si,soi->so", v, g)
            elif c.spelling == "matmul":
                o = torch.matmul(v.unsqueeze(1), g if c.transposed else g.transpose(1, 2)).squeeze(1)
            else:
                o = (torch.bmm(v.unsqueeze(1), g).squeeze(1) if c.transposed
                     else torch.bmm(g, v.unsqueeze(-1)).squeeze(-1))
            return o + bias[flat] if bias is not None else o

        rows = x.repeat_interleave(c.K, dim=0)
        a = self.up(lambda weight, bias: linear(rows, weight, bias))
        o = self.capacity(linear(a, self.w2, self.b2)) * w.reshape(-1, 1).to(x.dtype)
        if c.combine == "index_add":
            return torch.zeros_like(x).index_add(0, torch.arange(x.shape[0]).repeat_interleave(c.K), o), a
        return o.view(x.shape[0], c.K, c.H).sum(dim=1), a

    def grouped(self, x, ids, w):
        """transformers 5.x's grouped_mm experts, op for op (sort → x[perm // K] → histc offsets → grouped
        linear → act → grouped linear → weights → unpermute → sum over K), with transformers' own grouped
        linear: under dynamo in fp32/fp16 it is `transformers::grouped_mm_fallback`, as in real models."""
        c = self.c
        sort, count, unpermute = (c.spelling if c.spelling != "default" else "sort+histc+inverse").split("+")
        flat = ids.reshape(-1)
        if sort == "sort":
            ids_g, perm = torch.sort(flat)
        else:
            perm = torch.argsort(flat, stable=sort == "argsort_stable")
            ids_g = flat[perm]
        x_g, w_g = x[perm // c.K], w.reshape(-1)[perm]
        counts = {
            "histc": lambda: torch.histc(ids_g.float(), bins=c.E, min=0, max=c.E - 1),
            "scatter_add": lambda: torch.zeros(c.E, dtype=torch.long).scatter_add(0, flat, torch.ones_like(flat)),
            "one_hot": lambda: F.one_hot(flat, c.E).sum(0),
            "routing_map": lambda: torch.zeros(ids.shape[0], c.E, dtype=torch.bool).scatter_(1, ids, True).sum(0),
        }[count]()
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        b1 = self.b1[ids_g] if self.b1 is not None else None
        a = self.up(lambda weight, bias: _grouped_linear(x_g, weight, offsets, bias=b1 if bias is not None else None,
                                                         is_transposed=c.transposed))
        b2 = self.b2[ids_g] if self.b2 is not None else None
        o = self.capacity(_grouped_linear(a, self.w2, offsets, bias=b2, is_transposed=c.transposed))
        o = o * w_g.unsqueeze(-1)
        if c.combine == "index_add":  # scattered back by token straight from the expert-sorted rows
            return torch.zeros_like(x).index_add(0, perm // c.K, o), a
        if unpermute == "inverse":
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.size(0))
            pairs = o[inv]
        elif unpermute == "setitem":
            pairs = torch.empty_like(o)
            pairs[perm] = o
        else:
            pairs = torch.zeros_like(o).index_copy(0, perm, o)
        return pairs.view(x.shape[0], c.K, c.H).sum(dim=1).to(x.dtype), a


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread. Eager's own CPU backward of these layers is not bit-reproducible on more:
    30 identical eager runs of Layer(E=11, K=5, H=24, I=12, T=13, gathered, softmax_topk) gave 19 different
    router gradients on 2 threads, one on 1 — and "left alone ⇒ eager's bits" needs eager to have one answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def interpreter(on: bool):
    """TRITON_INTERPRET=1 for the block when `on` (the cpu_path fixture removed it for the test)."""
    if not on:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        del os.environ["TRITON_INTERPRET"]


def _count(c: Layer, outcome: str, shared_inside: bool = False, path: str = "cpu") -> None:
    STATS["twist: outcome"][f"{c.twist}: {outcome}"] += 1
    verdict = "lowered" if outcome == "lowered" else "left alone"
    STATS["routing"][f"{c.routing}: {verdict}"] += 1
    STATS["form"][f"{c.form}: {verdict}"] += 1
    STATS["spelling"][f"{c.form}/{c.spelling}{'/w1,w3' if split(c) else ''}: {verdict}"] += 1
    STATS["path"][f"{path}: {verdict}"] += 1
    where = ""
    if c.shared != "none" and verdict == "lowered":  # either is right: the op may or may not take it in
        where = " (inside the op)" if shared_inside else " (beside the op)"
    STATS["shared expert"][f"{c.shared}: {verdict}{where}"] += 1
    if c.grad:
        STATS["with backward"][verdict] += 1


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
    before = dict(moe_op.counters)
    path = "triton" if zlib.crc32(f"{c} {seed}".encode()) % INTERPRETER_EVERY == 0 else "cpu"
    if c.grad:
        params = [x.requires_grad_(), *model.parameters()]
        cotangent = torch.randn(c.T, c.H, dtype=dtype)
        with one_thread():
            ref = model(x)
            ref_grads = torch.autograd.grad(ref, params, cotangent)
            with interpreter(path == "triton"):
                out = torch.compile(model, backend=backend)(x)
                grads = torch.autograd.grad(out, params, cotangent)
        ran = tuple(moe_op.counters[k] - before[k] for k in (f"fwd_train_{path}", f"bwd_{path}"))
    else:
        with torch.no_grad(), interpreter(path == "triton"):
            ref = model(x)
            out = torch.compile(model, backend=backend)(x)
        ran = (moe_op.counters[path] - before[path],)
    lowered, rejected = backend.explanation.lowered, backend.explanation.rejected
    repro = f"reproducer: {c} seed={seed} path={path}\n{backend.explanation}"
    if lowered:
        _count(c, "lowered", lowered[0].spec.shared is not None, path)
        assert len(lowered) == 1 and set(ran) == {1}, repro
        if dtype == torch.float32:
            err = rel_err(out, ref)
            assert err <= TOL[dtype], f"lowered but wrong (rel. err {err:.3g}); {repro}"
        else:
            with torch.no_grad():
                ref32 = fp32_twin(model)(x.float())
            assert_parity(out, ref, ref32, dtype, what=f"lowered but wrong; {repro}")
        if c.grad:
            names = ["x", *(n for n, _ in model.named_parameters())]
            floor = max(GRAD_FLOOR * max(r.abs().max().item() for r in ref_grads), 1e-30)
            errs = {n: (g - r).abs().max().item() / max(r.abs().max().item(), floor)
                    for n, g, r in zip(names, grads, ref_grads)}
            worst = max(errs, key=errs.get)
            assert errs[worst] <= GRAD_TOL, f"lowered but d{worst} wrong (rel. err {errs[worst]:.3g}); {repro}"
    else:
        _count(c, ",".join(sorted({r.reason.name for r in rejected})) or "no candidate", path=path)
        assert set(ran) == {0}, repro
        assert torch.equal(out, ref), f"left alone but changed; {repro}"
        if c.grad:
            assert all(map(torch.equal, grads, ref_grads)), f"left alone but gradients changed; {repro}"


def lowered_fraction(key: str, what: str) -> tuple[float, int]:
    """(lowered fraction, layers drawn) of `what` (a form, or a path) in STATS[key]."""
    lowered, total = STATS[key][f"{what}: lowered"], STATS[key][f"{what}: lowered"] + STATS[key][f"{what}: left alone"]
    return (lowered / total if total else 0.0), total


def test_lowered_fraction_per_form():
    """The fuzz above cannot pass by lowering nothing: each expert form, and the interpreter's share, has at
    least its MIN_LOWERED fraction lowered (run after the fuzz in this module; runs the fuzz itself when it did
    not run, e.g. when selected alone)."""
    if not STATS["form"]:
        test_generated_layer_is_lowered_exactly_or_left_alone()
    for form in ("dense", "gathered", "grouped_mm"):
        fraction, total = lowered_fraction("form", form)
        assert total >= 10 and fraction >= MIN_LOWERED[form], f"{form}: {fraction:.2f} of {total} lowered\n{summary()}"
    fraction, total = lowered_fraction("path", "triton")
    assert total >= 5 and fraction >= MIN_LOWERED["interpreter"], \
        f"through the interpreter: {fraction:.2f} of {total} lowered\n{summary()}"


def summary() -> str | None:
    """The outcome counts, printed at the end of the run by tests/conftest.py."""
    if not STATS:
        return None
    total = sum(STATS["twist: outcome"].values())
    return f"fuzz: {total} generated layers (outcome × count)\n" + "\n".join(
        f"  by {what}: " + ", ".join(f"{k} × {v}" for k, v in sorted(counts.items()))
        for what, counts in STATS.items())
