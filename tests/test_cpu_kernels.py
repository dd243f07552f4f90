"""The generated C++ CPU kernels (moefuse/kernels/cpu.py, cpu_moe.cpp), tested like the Triton kernels: against
a float64 reference of the same layer on the labelled edge cases, bf16 within the parity bound derived from
bf16 rounding (moefuse.tolerance), bitwise deterministic across calls and thread counts, the portable
(no AVX-512) build as well, forward and backward, and the fallback to the torch plan with its reason.

Shapes are small and odd (H=40, I=24: not multiples of the 16-lane vectors) so that every tail is exercised;
T=300 over 4 experts gives experts of > 32 rows (the packed-panel form), T ≤ 5 the dot-product form.
"""
from __future__ import annotations

import math

import pytest
import sympy
import torch

from moefuse import expr as E
from moefuse.kernels import cpu as K
from moefuse.runtime import cpu as R
from moefuse.spec import Activation, MoESpec
from moefuse.testing import assert_parity

SWIGLU = "x0*x1*sigmoid(x0)"


def make_spec(E_=4, K_=2, H=40, I=24, expr=SWIGLU, slices=None, dtype=torch.float32, bias=False, w3=False):  # noqa: E741
    slices = slices or ((0, 1), (I, 1))
    N1 = 2 * I if len(slices) == 2 else I
    dt = str(dtype).removeprefix("torch.")
    return MoESpec(E_, K_, H, I, N1, Activation(expr, slices), dt, dt, bias, bias, w3=w3)


def make_inputs(spec: MoESpec, T: int, dtype=torch.float32, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    E_, K_, H, I, N1 = spec.num_experts, spec.top_k, spec.hidden, spec.intermediate, spec.up_rows  # noqa: E741
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E_, generator=g)[:K_] for _ in range(T)]) if T else torch.zeros(0, K_, dtype=torch.long)
    w = torch.rand(T, K_, generator=g).to(dtype)
    rows1 = I if spec.w3 else N1
    w1 = (torch.randn(E_, rows1, H, generator=g) / math.sqrt(H)).to(dtype)
    w3 = (torch.randn(E_, I, H, generator=g) / math.sqrt(H)).to(dtype) if spec.w3 else None
    w2 = (torch.randn(E_, H, I, generator=g) / math.sqrt(I)).to(dtype)
    if transposed:  # [E, in, out] storage, seen as [E, out, in] (GPT-OSS, torchtitan)
        w1, w2 = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w1, w2))
    b1 = torch.randn(E_, N1, generator=g).to(dtype) if spec.w1_bias else None
    b2 = torch.randn(E_, H, generator=g).to(dtype) if spec.w2_bias else None
    return x, ids, w, w1, w2, b1, b2, w3


def _d(t):
    return t.double() if t is not None else None


def reference(spec, x, ids, w, w1, w2, b1, b2, w3, dy=None):
    """(y, h[, grads]) of the torch plan in float64 on the same (dtype-valued) inputs."""
    pairs = R._Pairs.from_top_k(ids, _d(w))
    y, h = R._torch_forward(spec, _d(x), pairs, _d(w1), _d(w2), _d(b1), _d(b2), True, torch.float64, _d(w3))
    if dy is None:
        return y, h
    return y, h, R._torch_backward(spec, _d(dy), _d(x), pairs, _d(w1), _d(w2), _d(b1), _d(b2), h, _d(w3))


def torch_plan(spec, x, ids, w, w1, w2, b1, b2, w3, dtype, dy=None):
    """The torch plan in the dtype: eager's error for the parity bound."""
    pairs = R._Pairs.from_top_k(ids, w)
    y, h = R._torch_forward(spec, x, pairs, w1, w2, b1, b2, True, dtype, w3)
    if dy is None:
        return y, h
    return y, h, R._torch_backward(spec, dy, x, pairs, w1, w2, b1, b2, h, w3)


def run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3, save_h=True, out_dtype=None):
    assert K.unavailable(spec, x, w1, w2, w3, out_dtype or x.dtype) is None
    before = K.counters["forward"]
    y, h = K.forward(spec, x, ids, w, None, ids.shape[1], w1, w2, b1, b2, w3, save_h, out_dtype or x.dtype)
    assert K.counters["forward"] == before + 1
    return y, h


def assert_close64(got, ref, what, rel=2e-6):
    """fp32 against float64: a few units of fp32 roundoff at the reference's scale, summed over the reduction."""
    assert got.shape == ref.shape, what
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-30), f"{what}: max error {err:.3g} vs scale {ref.abs().max():.3g}"


# ---- Forward, fp32, against float64 ------------------------------------------------------------------------

FORWARD_CASES = {
    # name: (spec kwargs, T, input kwargs)
    "T0": ({}, 0, {}),
    "T1": ({}, 1, {}),
    "few_rows": ({}, 5, {}),
    "many_rows": ({}, 300, {}),
    "K_equals_E": ({"K_": 4}, 37, {}),
    "biases": ({"bias": True}, 300, {}),
    "w3_apart": ({"w3": True}, 300, {}),
    "interleaved": ({"slices": ((0, 2), (1, 2))}, 300, {}),
    "one_input_gelu": ({"expr": "gelu(x0)", "slices": ((0, 1),), "I": 24}, 300, {}),
    "double_read": ({"slices": ((0, 1), (0, 1)), "expr": "x0*x1*sigmoid(x0)"}, 37, {}),
    "transposed_weights_many": ({}, 300, {"transposed": True}),
    "transposed_weights_few": ({}, 3, {"transposed": True}),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_matches_float64(case):
    spec_kw, T, in_kw = FORWARD_CASES[case]
    spec = make_spec(**spec_kw)
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, T, **in_kw)
    y, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
    y_ref, h_ref = reference(spec, x, ids, w, w1, w2, b1, b2, w3)
    assert_close64(y, y_ref, "y")
    read = read_rows(spec)  # H holds the rows the activation reads; the kernels never compute the others
    assert_close64(h[:, read], h_ref[:, read], "h")
    assert not h[:, ~read].any()


def read_rows(spec: MoESpec) -> torch.Tensor:
    read = torch.zeros(spec.up_rows, dtype=torch.bool)
    for off, step in spec.activation.slices:
        read[off : off + step * (spec.intermediate - 1) + 1 : step] = True
    return read


def test_forward_routing_edge_cases():
    """Empty experts, duplicated ids (one expert twice for a token), dropped ids (-1 and E: no expert, no
    contribution, zero h rows) in one routing."""
    spec = make_spec(E_=6, K_=3)
    x, _, w, w1, w2, b1, b2, w3 = make_inputs(spec, 40)
    ids = torch.randint(0, 2, (40, 3)) * 3  # experts 0 and 3 only: 1, 2, 4, 5 are empty
    ids[0] = torch.tensor([3, 3, 3])  # duplicated
    ids[1, 1], ids[2, 2], ids[5] = -1, 6, torch.tensor([-1, 6, -7])  # dropped; token 5 has no expert at all
    y, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
    y_ref, h_ref = reference(spec, x, ids, w, w1, w2, b1, b2, w3)
    assert_close64(y, y_ref, "y")
    assert_close64(h, h_ref, "h")
    assert torch.equal(y[5], torch.zeros_like(y[5]))
    assert int((h.abs().sum(1) == 0).sum()) == 5  # the five dropped pairs' rows, sorted last


def test_nan_propagates_like_the_reference():
    """A NaN in a token's input poisons that token's output only; a NaN weight poisons the tokens routed to
    that expert only — as in eager."""
    spec = make_spec()
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 300)
    x[7, 3] = float("nan")
    w2 = w2.clone()
    w2[2, 5, 1] = float("nan")
    y, _ = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
    y_ref, _ = reference(spec, x, ids, w, w1, w2, b1, b2, w3)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert y[7].isnan().all() and y.isnan().any(1).sum() > 1
    ok = ~y_ref.isnan()
    assert_close64(y[ok], y_ref[ok], "finite part")


def test_activation_helpers_against_float64():
    """The printed C activations (and derivatives) with the vectorizable mf_* helpers, on a dense grid plus
    the saturating ends, ±inf and NaN, against torch in float64."""
    grid = torch.cat([torch.linspace(-30, 30, 4001), torch.logspace(-30, 1, 200), -torch.logspace(-30, 1, 200),
                      torch.tensor([0.0, -0.0, 88.0, 89.5, -103.0, -110.0, float("inf"), float("-inf"), float("nan")])])
    x0v, x1v = E.variables(2)
    cases = {
        "silu": E.silu(x0v), "gelu": E.gelu(x0v), "gelu_tanh": E.gelu(x0v, "tanh"), "softplus": E.softplus(x0v),
        "mish": E.mish(x0v), "elu": E.elu(x0v), "exp": sympy.exp(x0v), "tanh": E.tanhshrink(x0v) - x0v,
        "gpt_oss": E.clamp(x0v, max=7) * E.sigmoid(E.const(1.702) * E.clamp(x0v, max=7)) * (E.clamp(x1v, -7, 7) + 1),
    }
    for name, expr in cases.items():
        n = 2 if x1v in expr.free_symbols else 1
        text = E.to_str(expr)
        spec = make_spec(expr=text, slices=((0, 1), (24, 1))[:n])
        x1 = grid.flip(0)
        got = K.eval_activation(spec, grid, x1)
        fn = E.torch_fn(text, n)
        args = (grid.double(), x1.double())[:n]
        args32 = (grid, x1)[:n]
        fns = [fn] + [E.torch_fn(g, n) for g in E.gradient(text, n)]
        wants = [f(*args) for f in fns] + [torch.zeros_like(grid.double())] * (2 - n)
        wants32 = [f(*args32) for f in fns] + [torch.zeros_like(grid)] * (2 - n)
        for what, a, b, b32 in zip(("value", "d/dx0", "d/dx1"), got, wants, wants32):
            # NaN in, NaN out; ±inf where torch's fp32 evaluation has them. Where a formula's intermediate
            # overflows in fp32 (mish's derivative multiplies exp(x) ≈ 1e38 by x before dividing, near
            # x = 88) the result depends on the evaluation order: allowed only out there.
            nan_in = grid.isnan() | (x1.isnan() & (n == 2))
            assert torch.equal(a[nan_in].isnan(), b32[nan_in].isnan()), f"{name} {what}: NaN input, other output"
            assert what != "value" or a[nan_in].isnan().all(), f"{name}: a NaN input gave a number"
            differ = (a.isfinite() != b32.isfinite()) | (a.isinf() & b32.isinf() & (a != b32))
            assert (grid[differ].abs() > 80).all(), f"{name} {what}: overflow differs at {grid[differ][:3].tolist()}"
            fin = b32.isfinite() & b.isfinite() & a.isfinite()
            # A few fp32 ulps of the value, plus fp32 roundoff of terms of the inputs' size: where terms cancel
            # (silu' crosses 0 near x = -1.28) fp32 cannot do better, nor can torch in fp32.
            scale = 1 + grid.abs().double() + x1.abs().double()
            bound = 1e-5 * b[fin].abs() + 2e-7 * scale[fin]
            bad = (a[fin].double() - b[fin]).abs() > bound
            assert not bad.any(), f"{name} {what}: worst at {grid[fin][bad][:3].tolist()}"


# ---- bf16: the parity bound of moefuse.tolerance -------------------------------------------------------------

@pytest.mark.parametrize("T", [5, 300])
@pytest.mark.parametrize("w3", [False, True], ids=["glu", "w3"])
def test_bf16_forward_and_backward_within_parity(T, w3):
    spec = make_spec(H=64, I=48, dtype=torch.bfloat16, w3=w3, bias=not w3)
    x, ids, w, w1, w2, b1, b2, w3t = make_inputs(spec, T, dtype=torch.bfloat16)
    dy = torch.randn(T, spec.hidden, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    y, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3t)
    before = K.counters["backward"]
    grads = R.moe_backward_cpu(spec, dy, x, ids, w, w1, w2, b1, b2, h, w3=w3t)
    assert K.counters["backward"] == before + 1
    y_ref, h_ref, g_ref = reference(spec, x, ids, w, w1, w2, b1, b2, w3t, dy)
    y_eager, h_eager, g_eager = torch_plan(spec, x, ids, w, w1, w2, b1, b2, w3t, torch.bfloat16, dy)
    assert_parity(y, y_eager, y_ref, torch.bfloat16, "y")
    assert_parity(h, h_eager, h_ref, torch.bfloat16, "h")
    names = ("dx", "dtopk_w", "dw1", "dw2", "db1", "db2", "dw3")
    for name, g, ge, gr in zip(names, grads, g_eager, g_ref):
        if gr is None:
            assert g is None, name
            continue
        assert g.dtype == torch.bfloat16 or name in ("db1", "db2"), name
        assert_parity(g.reshape(gr.shape), ge.reshape(gr.shape), gr, torch.bfloat16, name)


# ---- Backward, fp32 -------------------------------------------------------------------------------------------

BACKWARD_CASES = {
    "T1": ({}, 1),
    "few_rows": ({}, 5),
    "many_rows": ({}, 300),
    "biases_and_drops": ({"bias": True}, 300),
    "w3_apart": ({"w3": True}, 300),
    "interleaved": ({"slices": ((0, 2), (1, 2))}, 37),
    "double_read": ({"slices": ((0, 1), (0, 1))}, 37),
    "one_input": ({"expr": "gelu(x0)", "slices": ((0, 1),)}, 37),
    "K_equals_E": ({"K_": 4}, 37),
}


@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
def test_backward_matches_float64(case):
    spec_kw, T = BACKWARD_CASES[case]
    spec = make_spec(**spec_kw)
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, T)
    if case == "biases_and_drops":
        ids[0, 0], ids[3, 1] = -1, spec.num_experts
    dy = torch.randn(T, spec.hidden, generator=torch.Generator().manual_seed(3))
    _, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
    before = K.counters["backward"]
    grads = R.moe_backward_cpu(spec, dy, x, ids, w, w1, w2, b1, b2, h, w3=w3)
    assert K.counters["backward"] == before + 1
    *_, g_ref = reference(spec, x, ids, w, w1, w2, b1, b2, w3, dy)
    g_ref = (g_ref[0], g_ref[1].view(ids.shape), *g_ref[2:])
    for name, g, gr in zip(("dx", "dtopk_w", "dw1", "dw2", "db1", "db2", "dw3"), grads, g_ref):
        if gr is None:
            assert g is None, name
            continue
        assert_close64(g, gr, name, rel=4e-6)
    if case == "biases_and_drops":
        assert grads[1][0, 0] == 0 and grads[1][3, 1] == 0


def test_experts_without_rows_get_zero_weight_gradients():
    spec = make_spec(E_=6)
    x, _, w, w1, w2, b1, b2, w3 = make_inputs(spec, 20)
    ids = torch.zeros(20, 2, dtype=torch.long)
    ids[:, 1] = 2
    dy = torch.randn(20, spec.hidden)
    _, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
    _, _, dw1, dw2, *_ = R.moe_backward_cpu(spec, dy, x, ids, w, w1, w2, b1, b2, h)
    for e in (1, 3, 4, 5):
        assert not dw1[e].any() and not dw2[e].any()
    assert dw1[0].any() and dw2[2].any()


# ---- Determinism, threads, portable build ----------------------------------------------------------------------

def test_bitwise_deterministic_across_calls_and_thread_counts():
    spec = make_spec(bias=True)
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 300)
    dy = torch.randn(300, spec.hidden)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            y, h = run_kernels(spec, x, ids, w, w1, w2, b1, b2, w3)
            results.append((y, h, *R.moe_backward_cpu(spec, dy, x, ids, w, w1, w2, b1, b2, h)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_build_matches(dtype, monkeypatch):
    """The GCC-vector code that runs where AVX-512 is missing: built here with MOEFUSE_PORTABLE, same results
    within the dtype's bound."""
    spec = make_spec(dtype=dtype)
    lib = K.library(spec, dtype, portable=True)
    assert lib.mf_isa() == 0
    real = K.library
    monkeypatch.setattr(K, "library", lambda s, d, portable=False: real(s, d, True))
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 300, dtype=dtype)
    dy = torch.randn(300, spec.hidden).to(dtype)
    y, h = K.forward(spec, x, ids, w, None, 2, w1, w2, b1, b2, w3, True, dtype)
    grads = K.backward(spec, dy, x, ids, w, None, 2, w1, w2, b1, b2, h, w3)
    y_ref, h_ref, g_ref = reference(spec, x, ids, w, w1, w2, b1, b2, w3, dy)
    if dtype == torch.float32:
        assert_close64(y, y_ref, "y")
        assert_close64(grads[2], g_ref[2], "dw1", rel=4e-6)
    else:
        y_eager, _, g_eager = torch_plan(spec, x, ids, w, w1, w2, b1, b2, w3, dtype, dy)
        assert_parity(y, y_eager, y_ref, dtype, "y")
        assert_parity(grads[0], g_eager[0], g_ref[0], dtype, "dx")


# ---- Flat pairs, dispatch and fallback -------------------------------------------------------------------------

def test_flat_pairs_run_the_kernels_and_match_top_k():
    spec = make_spec()
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 37)
    T, K_ = ids.shape
    token = torch.arange(T).repeat_interleave(K_)
    offsets = torch.arange(T + 1) * K_
    before = K.counters["forward"]
    y_flat = R.moe_pairs_forward_cpu(spec, x, token, ids.reshape(-1), w.reshape(-1), offsets, w1, w2)
    assert K.counters["forward"] == before + 1
    y_ref, _ = reference(spec, x, ids, w, w1, w2, b1, b2, w3)
    assert_close64(y_flat, y_ref, "y")
    bad = token.clone()
    bad[4] = T
    from moefuse.errors import InputError

    with pytest.raises(InputError, match="pair_token"):
        R.moe_pairs_forward_cpu(spec, x, bad, ids.reshape(-1), w.reshape(-1), offsets, w1, w2)


def test_fallback_to_the_torch_plan_says_why(monkeypatch):
    spec = make_spec()
    x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 37)
    y_kern = R.moe_forward_cpu(spec, x, ids, w, w1, w2)
    before = dict(K.counters)
    monkeypatch.setenv("MOEFUSE_CPU_KERNELS", "0")
    assert K.unavailable(spec, x, w1, w2, None, x.dtype) == "MOEFUSE_CPU_KERNELS=0"
    assert "torch plan" in K.describe(spec)[0] and "MOEFUSE_CPU_KERNELS=0" in K.describe(spec)[0]
    y_plan = R.moe_forward_cpu(spec, x, ids, w, w1, w2)
    assert K.counters == before
    torch.testing.assert_close(y_kern, y_plan, rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("MOEFUSE_CPU_KERNELS")
    assert K.unavailable(spec, x.half(), w1.half(), w2.half(), None, torch.float16).startswith("x is torch.float16")
    assert "weights of" in K.unavailable(spec, x, w1.double(), w2, None, x.dtype)
    odd = torch.randn(4, 48, 40 * 3)[:, :, ::3]  # no unit stride along either matrix dim
    assert "unit stride" in K.unavailable(spec, x, odd, w2, None, x.dtype)


def test_no_compiler_falls_back_with_the_reason(monkeypatch):
    spec = make_spec(H=8, I=8)  # a layer built nowhere else, so nothing is cached
    attempts = []
    monkeypatch.setattr(K, "_load", lambda source: attempts.append(1) or _fail_load(source))
    K._library.cache_clear()
    try:
        x, ids, w, w1, w2, b1, b2, w3 = make_inputs(spec, 9)
        why = K.unavailable(spec, x, w1, w2, None, x.dtype)
        assert why.startswith("the C++ kernels did not build") and "no compiler here" in why
        assert why in K.describe(spec)[0]
        y = R.moe_forward_cpu(spec, x, ids, w, w1, w2)
        y_ref, _ = reference(spec, x, ids, w, w1, w2, b1, b2, w3)
        assert_close64(y, y_ref, "y")
        R.moe_forward_cpu(spec, x, ids, w, w1, w2)
        assert len(attempts) == 1  # the failure is remembered: one failed build, not one per call
    finally:
        K._library.cache_clear()


def _fail_load(source):
    raise K._Unbuildable("the C++ kernels did not build (CalledProcessError: no compiler here)")


def test_describe_names_the_generated_kernels():
    lines = K.describe(make_spec())
    assert lines[0].startswith("cpu: generated C++") and "x0*x1*sigmoid(x0)" in " ".join(lines)
