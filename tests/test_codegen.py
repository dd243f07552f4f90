"""Printing activation expressions as Triton (moefuse.kernels.codegen): golden sources, numerics under the
interpreter against float64 torch, helper accuracy in ulps, the kernel cache, and a compile for sm_90.

MOEFUSE_UPDATE_GOLDEN=1 rewrites tests/golden/activation_*.py.expected (and activation_grad_*, the backward's
value-and-derivatives functions) from the current printer.
"""
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch
import triton
import triton.language as tl

from moefuse import expr as E
from moefuse.kernels import codegen
from moefuse.kernels.codegen import HELPERS, load_activation, load_activation_grad, triton_grad_source, triton_source

GOLDEN_DIR = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]

# name -> (expression, inputs). The golden files show, as a readable diff, every change of generated code.
GOLDEN = {
    "swiglu": ("silu(x0)*x1", 2),
    "gpt_oss": ("(clamp(x1, -7, 7) + 1)*clamp(x0, max=7)*sigmoid(1.702*clamp(x0, max=7))", 2),
    "gelu_tanh": ("gelu(x0, approximate='tanh')", 1),
    "relu": ("relu(x0)", 1),
    "relu_squared": ("relu(x0)**2", 1),
    "mish_like": ("x0*tanh(softplus(x0))", 1),
}
# The activations whose gradient functions (`triton_grad_source`) are golden too.
GOLDEN_GRAD = ("swiglu", "gpt_oss", "gelu_tanh", "relu")
SOURCES = {"activation": triton_source, "activation_grad": triton_grad_source}


@triton.jit
def _apply(x0_ptr, x1_ptr, y_ptr, n, ACT: tl.constexpr, N_INPUTS: tl.constexpr, BLOCK: tl.constexpr):
    """y = ACT(x0[, x1]) elementwise over n fp32 values; each program owns BLOCK consecutive elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x0 = tl.load(x0_ptr + offs, mask=mask)
    if N_INPUTS == 2:
        y = ACT(x0, tl.load(x1_ptr + offs, mask=mask))
    else:
        y = ACT(x0)
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _apply_grad(x0_ptr, x1_ptr, y_ptr, d0_ptr, d1_ptr, n, ACT_GRAD: tl.constexpr, N_INPUTS: tl.constexpr,
                BLOCK: tl.constexpr):
    """(y, d0[, d1]) = ACT_GRAD(x0[, x1]) elementwise over n fp32 values, as `_apply`."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x0 = tl.load(x0_ptr + offs, mask=mask)
    if N_INPUTS == 2:
        y, d0, d1 = ACT_GRAD(x0, tl.load(x1_ptr + offs, mask=mask))
        tl.store(d1_ptr + offs, d1, mask=mask)
    else:
        y, d0 = ACT_GRAD(x0)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(d0_ptr + offs, d0, mask=mask)


def run_activation_grad(expr_str: str, n_inputs: int, *xs: torch.Tensor) -> list[torch.Tensor]:
    """[act, ∂act/∂x0, …] from the generated `load_activation_grad` function."""
    outs = [torch.empty_like(xs[0]) for _ in range(n_inputs + 1)]
    block = 1024
    _apply_grad[(triton.cdiv(xs[0].numel(), block),)](
        xs[0], xs[-1], outs[0], outs[1], outs[-1], xs[0].numel(), ACT_GRAD=load_activation_grad(expr_str, n_inputs),
        N_INPUTS=n_inputs, BLOCK=block)
    return outs


def run_activation(expr_str: str, n_inputs: int, *xs: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(xs[0])
    block = 1024
    _apply[(triton.cdiv(y.numel(), block),)](xs[0], xs[-1], y, y.numel(), ACT=load_activation(expr_str, n_inputs),
                                             N_INPUTS=n_inputs, BLOCK=block)
    return y


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moefuse-cache"))


# Golden sources ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,name",
                         [("activation", n) for n in GOLDEN] + [("activation_grad", n) for n in GOLDEN_GRAD])
def test_golden_source(kind, name):
    text, n = GOLDEN[name]
    source = SOURCES[kind](E.parse(text), n)
    path = GOLDEN_DIR / f"{kind}_{name}.py.expected"
    if os.environ.get("MOEFUSE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
    assert path.exists(), f"{path} is missing: run with MOEFUSE_UPDATE_GOLDEN=1 to create it"
    assert source == path.read_text(), "generated code changed; if intended, rerun with MOEFUSE_UPDATE_GOLDEN=1"


def test_source_is_deterministic_and_canonical():
    """Two spellings of one expression give one module (the cache file is named by the source's hash)."""
    a = triton_source(E.parse("silu(x0)*x1"), 2)
    b = triton_source(E.parse("x1*x0*sigmoid(x0)"), 2)
    assert a == b == triton_source(E.parse(E.to_str(E.parse("silu(x0)*x1"))), 2)


def test_printer_details():
    src = triton_source(E.parse("x0**3 + (x0 + 1)**2 - 1/x0**2 + 2**x0 + Abs(x0)**(3/2) + x0**1.5"), 1)
    body = src.split("def activation(x0):\n")[1]
    assert "x0*x0*x0" in body and "(t0*t0)" in body  # integer powers are products, a compound base bound once
    assert "tl.exp2(x0)" in body  # 2**x0, log2(2) folded away
    assert "tl.sqrt_rn" in body and "**" not in body
    assert "propagate_nan" not in body and "_tanh" not in src  # helpers only when used
    # every literal is a float literal, so nothing is computed in integer arithmetic
    assert not re.search(r"(?<![\w.])\d+(?![\w.])", body.replace("t0", "").replace("x0", ""))


@pytest.mark.parametrize("expr,n,error,words", [
    (sympy.sin(E.variables(1)[0]), 1, E.UnsupportedExpression, "sin"),
    (E.variables(2)[0] ** E.variables(2)[1], 2, E.UnsupportedExpression, "constant exponent"),
    (E.variables(1)[0] ** 100, 1, E.UnsupportedExpression, "above 64"),
    (sympy.Piecewise((E.variables(1)[0], E.variables(1)[0] > 0)), 1, E.UnsupportedExpression, "final"),
    (E.parse("x0*x1"), 1, E.ExprError, "only 1 input"),
])
def test_unprintable(expr, n, error, words):
    with pytest.raises(error, match=words):
        triton_source(expr, n)


def test_every_function_is_printable():
    for f in E.FUNCTIONS:
        assert f"_print_{f.__name__}" in vars(codegen._TritonPrinter), f"no Triton printing for {f.__name__}"
    assert {f for s, _ in INTERPRETED for f in _functions(E.parse(s))} == E.FUNCTIONS  # and each one is run below


def _functions(e):
    return {type(a) for a in sympy.preorder_traversal(e) if type(a) in E.FUNCTIONS}


# Numerics under the interpreter -----------------------------------------------------------------------

INTERPRETED = [(text, n) for text, n in GOLDEN.values()] + [
    ("gelu(x0)*x1", 2), ("mish(x0)", 1), ("logsigmoid(x0)", 1), ("selu(x0)", 1), ("celu(x0, 2)", 1),
    ("hardswish(x0)", 1), ("softsign(x0)", 1), ("tanhshrink(x0)", 1), ("softplus(x0, 2, 5)", 1),
    ("leaky_relu(x0, 0.2)*x1", 2), ("Heaviside(x0) + sign(x0)*x1", 2), ("Abs(x0)**(5/2)/(1 + x1**2)", 2),
    ("2**clamp(x0, -60, 60) + log(1 + x0**2) + exp(clamp(x0, max=80))", 1), ("sqrt(Abs(x0))*x1 - Abs(x1)**1.3", 2),
    ("Piecewise((x0, (x0 > 0) & (x0 < 1)), (x1, x0 > 5), (0, True))", 2), ("erf(x0)*exp(-x0**2)", 1),
    ("expm1(x0/4)*log1p(Abs(x1))", 2), ("Max(x0, x1, 0) + Min(x0, -x1)", 2), ("sigmoid(0)", 1),
]
# Where formulas overflow, saturate or switch branches: exp overflows past 88.7, softplus switches at 20,
# GPT-OSS clamps at ±7, relu/elu/leaky_relu switch at 0.
EDGES = [-100.0, -88.8, -30.0, -20.0, -7.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 7.0, 20.0, 30.0, 88.8, 100.0]


def discarded_branches_warn(test):
    """The interpreter evaluates with numpy, which warns where a branch that tl.where then discards overflows
    (exp(100) in softplus's log branch, 0/0 in a helper's small-|x| branch); the results are what is checked."""
    for message in ("overflow encountered", "invalid value encountered", "divide by zero encountered"):
        test = pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning")(test)
    return test


@pytest.mark.parametrize("text,n", INTERPRETED, ids=[t for t, _ in INTERPRETED])
@discarded_branches_warn
def test_interpreter_matches_torch(text, n):
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat([torch.randn(1000, generator=g) * 4, torch.tensor(EDGES)])
    x1 = torch.cat([torch.randn(1000, generator=g) * 4, torch.tensor(EDGES).flip(0)])  # edges meet ordinary x0
    xs = [x0, x1][:n]
    y = run_activation(text, n, *xs).double()
    ref = E.torch_fn(text, n)(*(x.double() for x in xs))
    # Same inf/NaN pattern: no formula may overflow into NaN (inf/inf, inf-inf) where torch is finite.
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[~finite], ref[~finite], equal_nan=True)
    assert torch.isfinite(y[finite]).all()
    # Tolerance, in units of 2^-23 (one fp32 ulp at 1): each op of the expression rounds once (<= 0.5) and the
    # non-core functions are helpers with <= 6 ulp (test_helper_accuracy); cancellation makes errors
    # absolute, of the size of the intermediates, bounded by prod(1 + |x_i|). Measured max: 2.1 units (the
    # generic power x**1.3 via exp2/log2); the bound is 8.
    scale = torch.ones_like(ref)
    for x in xs:
        scale = scale * (1 + x.double().abs())
    units = ((y - ref).abs() / (2.0**-23 * (ref.abs() + scale)))[finite]
    assert units.max() <= 8, f"error {units.max().item():.2f} units at x0={x0[finite][units.argmax()].item()}"


@pytest.mark.parametrize("text,n", INTERPRETED, ids=[t for t, _ in INTERPRETED])
@discarded_branches_warn
def test_gradient_interpreter_matches_autograd(text, n):
    """The backward's function (value, ∂/∂x0, …) against float64 torch.autograd of the same expression, at
    random points (a kink itself, where conventions differ, has measure zero). Same units and bound as
    test_interpreter_matches_torch; measured max: 2.4 units (gelu-tanh's derivative)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1000, generator=g) * 4 for _ in range(n)]
    got = [t.double() for t in run_activation_grad(text, n, *xs)]
    leaves = [x.double().requires_grad_() for x in xs]
    y = E.torch_fn(text, n)(*leaves)
    grads = (torch.autograd.grad(y.sum(), leaves, allow_unused=True, materialize_grads=True) if y.requires_grad
             else [torch.zeros_like(x) for x in leaves])  # a constant activation
    scale = torch.ones_like(leaves[0])
    for x in xs:
        scale = scale * (1 + x.double().abs())
    for i, (out, ref) in enumerate(zip(got, [y.detach(), *grads])):
        assert torch.isfinite(ref).all() and torch.isfinite(out).all(), i
        units = (out - ref).abs() / (2.0**-23 * (ref.abs() + scale))
        at = [x[units.argmax()].item() for x in xs]
        assert units.max() <= 8, f"output {i}: error {units.max().item():.2f} units at {at}"


def _ulp32(t: torch.Tensor) -> torch.Tensor:
    t = t.float().abs()
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double()


@pytest.mark.parametrize("helper,torch_ref,domain", [
    ("_tanh", torch.tanh, (-30, 30)), ("_expm1", torch.expm1, (-30, 30)), ("_log1p", torch.log1p, (-0.999, 30)),
])
@discarded_branches_warn
def test_helper_accuracy(helper, torch_ref, domain):
    """The `Max error N ulp` each helper's comment states, against float64 on a dense grid."""
    bound = float(re.search(r"Max error (\d+) ulp", HELPERS[helper][0]).group(1))
    lo, hi = domain
    tiny = torch.logspace(-30, 0, 20001)
    x = torch.cat([torch.linspace(lo, hi, 60001), torch.linspace(-0.6, 0.6, 20001), tiny, -tiny[tiny < -lo]])
    y = run_activation(E.to_str(E.parse(helper.lstrip("_") + "(x0)")), 1, x).double()
    ref = torch_ref(x.double())
    ulps = (y - ref).abs() / _ulp32(ref)
    assert ulps.max() <= bound, f"{helper}: {ulps.max().item():.2f} ulp at x={x[ulps.argmax()].item()}"


@discarded_branches_warn
def test_nan_propagates_like_torch():
    x = torch.tensor([float("nan"), 1.0])
    for text in ("relu(x0)", "clamp(x0, -7, 7)", "tanh(x0)", "sign(x0)"):
        assert run_activation(text, 1, x)[0].isnan(), text


# Loading and the kernel cache ---------------------------------------------------------------------------

def test_load_writes_cache_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path))  # read at call time
    text = "x0*sigmoid(x0) + 0.123456789"  # an expression no other test loads, so nothing is memoised yet
    fn = load_activation(text, 1)
    assert load_activation(text, 1) is fn
    (path,) = (tmp_path / "kernels").iterdir()  # one file: no temp file left behind
    assert path.read_text() == triton_source(E.parse(text), 1)
    assert Path(inspect.getsourcefile(fn.fn)) == path  # Triton reads the jit function's source from it
    torch.testing.assert_close(run_activation(text, 1, torch.zeros(3)), torch.full((3,), 0.123456789))


def test_load_grad_shares_the_cache(tmp_path, monkeypatch):
    """load_activation_grad goes through the same atomic, hash-named cache as load_activation, in a file of its own."""
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path))
    text = "x0*sigmoid(x0) + 0.987654321"  # not loaded by any other test
    fn = load_activation_grad(text, 1)
    assert load_activation_grad(text, 1) is fn
    (path,) = (tmp_path / "kernels").iterdir()
    assert path.name.startswith("activation_grad_") and path.read_text() == triton_grad_source(E.parse(text), 1)
    assert Path(inspect.getsourcefile(fn.fn)) == path
    load_activation(text, 1)
    assert len(list((tmp_path / "kernels").iterdir())) == 2  # the forward's function is a different module
    value, slope = run_activation_grad(text, 1, torch.zeros(3))
    torch.testing.assert_close(value, torch.full((3,), 0.987654321))
    torch.testing.assert_close(slope, torch.full((3,), 0.5))  # d/dx x·sigmoid(x) at 0


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEFUSE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert codegen.cache_dir() == tmp_path / ".cache" / "moefuse" / "kernels"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(codegen.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        codegen.write_atomic(tmp_path / "k" / "activation_x.py", "source")
    assert list((tmp_path / "k").iterdir()) == []


# Compile for a GPU (no GPU needed) ---------------------------------------------------------------------

# Instructions each golden activation must compile to on sm_90: NaN-propagating min/max for clamp/relu,
# ex2.approx for exp/sigmoid (tl.exp is the fast exponential), and no calls (all helpers inline).
EXPECTED_PTX = {
    "swiglu": ["ex2.approx"], "gpt_oss": ["min.NaN.f32", "max.NaN.f32", "ex2.approx"],
    "gelu_tanh": ["ex2.approx", "min.NaN.f32"], "relu": ["max.NaN.f32"], "relu_squared": ["max.NaN.f32"],
    "mish_like": ["ex2.approx"],
    # the gradients: the same instructions, and (below) no calls either
    "swiglu_grad": ["ex2.approx"], "gpt_oss_grad": ["min.NaN.f32", "max.NaN.f32", "ex2.approx"],
    "gelu_tanh_grad": ["ex2.approx"], "relu_grad": ["max.NaN.f32"],
}

_COMPILE_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from test_codegen import GOLDEN, GOLDEN_GRAD, _apply, _apply_grad
from moefuse.kernels.codegen import load_activation, load_activation_grad

signature = {"x0_ptr": "*fp32", "x1_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32",
             "ACT": "constexpr", "N_INPUTS": "constexpr", "BLOCK": "constexpr"}
ptx = {}
for name, (text, n) in GOLDEN.items():
    constexprs = {"ACT": load_activation(text, n), "N_INPUTS": n, "BLOCK": 1024}
    kernel = triton.compile(triton.compiler.ASTSource(_apply, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    ptx[name] = kernel.asm["ptx"]
signature = {k: v for k, v in signature.items() if k != "ACT"}
signature.update({"d0_ptr": "*fp32", "d1_ptr": "*fp32", "ACT_GRAD": "constexpr"})
for name in GOLDEN_GRAD:
    text, n = GOLDEN[name]
    constexprs = {"ACT_GRAD": load_activation_grad(text, n), "N_INPUTS": n, "BLOCK": 1024}
    kernel = triton.compile(triton.compiler.ASTSource(_apply_grad, signature, constexprs),
                            target=GPUTarget("cuda", 90, 32))
    ptx[name + "_grad"] = kernel.asm["ptx"]
print(json.dumps(ptx))
"""


def test_compile_for_sm90(tmp_path):
    # A subprocess without TRITON_INTERPRET: `triton.jit` reads it when a function is defined, and conftest
    # sets it for this process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, needles in EXPECTED_PTX.items():
        code = ptx[name][ptx[name].index(".entry"):]
        for needle in needles:
            assert needle in code, f"{name}: {needle} not in PTX"
        assert "call." not in code and "\tcall" not in code, f"{name}: a helper was not inlined"
