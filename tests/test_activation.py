"""Lifting activations out of dynamo graphs (moefuse.passes.activation) and the expression language they
land in (moefuse.expr): every supported op is checked against torch's own numerics, every rejection for its
typed reason."""
import operator
import re

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moefuse import expr as E
from moefuse.testing import assert_parity
from moefuse.passes.activation import Reason, UnsupportedActivation, lift_activation, supported_ops

X0, X1 = E.variables(2)

# Inputs: a spread of ordinary values plus the points where formulas overflow or switch branches
# (softplus's threshold 20, exp overflow above 88, clamp bounds ±7, 0 for relu/leaky_relu/elu).
_EDGES = [-100.0, -30.0, -20.0, -7.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 7.0, 20.0, 30.0, 100.0]


def _inputs(n: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.cat([torch.randn(512, generator=g) * 4, torch.tensor(_EDGES)]) for _ in range(n)]
    xs[-1] = xs[-1].roll(3)  # pair each edge of x0 with an ordinary x1
    return [x.to(dtype) for x in xs]


def capture(fn, n_inputs: int) -> torch.fx.GraphModule:
    """The dynamo graph of `fn(x0[, x1])`, as a backend receives it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*_inputs(n_inputs))
    (gm,) = graphs
    return gm


def lift(fn, n_inputs: int) -> sympy.Expr:
    """Lift `fn`'s dynamo graph, mapping the placeholder of parameter x<i> to the variable x<i>."""
    gm = capture(fn, n_inputs)
    inputs = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        m = re.fullmatch(r"L_x(\d)_", node.target)
        if m and int(m.group(1)) < n_inputs:
            inputs[node] = E.variables(n_inputs)[int(m.group(1))]
    (out,) = gm.graph.find_nodes(op="output")[0].args[0]
    return lift_activation(out, inputs)


# (id, function of x0[, x1], number of inputs). Each line is one spelling dynamo records differently.
CASES = [
    # the activations the project exists for
    ("swiglu", lambda x0, x1: F.silu(x0) * x1, 2),
    ("swiglu_by_hand", lambda x0, x1: x0 * torch.sigmoid(x0) * x1, 2),
    ("gpt_oss", lambda x0, x1: (x1.clamp(-7, 7) + 1) * x0.clamp(max=7) * torch.sigmoid(1.702 * x0.clamp(max=7)), 2),
    ("geglu_tanh", lambda x0, x1: F.gelu(x0, approximate="tanh") * x1, 2),
    ("geglu", lambda x0, x1: F.gelu(x0) * x1, 2),
    ("gelu", lambda x0: F.gelu(x0), 1),
    ("relu", lambda x0: F.relu(x0), 1),
    ("relu_squared", lambda x0: torch.relu(x0) ** 2, 1),
    ("relu_squared_square", lambda x0: torch.square(x0.relu()), 1),
    ("mish_by_hand", lambda x0: x0 * torch.tanh(F.softplus(x0)), 1),
    ("mish", lambda x0: F.mish(x0), 1),
    # torch.nn.functional activations, defaults and non-defaults
    ("softplus_beta_threshold", lambda x0: F.softplus(x0, beta=2, threshold=5), 1),
    ("softplus_positional", lambda x0: F.softplus(x0, 0.5, 3), 1),
    ("leaky_relu", lambda x0: F.leaky_relu(x0), 1),
    ("leaky_relu_slope", lambda x0: F.leaky_relu(x0, 0.2), 1),
    ("elu", lambda x0: F.elu(x0, alpha=0.5), 1),
    ("celu", lambda x0: F.celu(x0, alpha=2.0), 1),
    ("selu", lambda x0: F.selu(x0), 1),
    ("hardtanh", lambda x0: F.hardtanh(x0, -2.0, 3.0), 1),
    ("relu6", lambda x0: F.relu6(x0), 1),
    ("hardsigmoid", lambda x0: F.hardsigmoid(x0), 1),
    ("hardswish", lambda x0: F.hardswish(x0), 1),
    ("logsigmoid", lambda x0: F.logsigmoid(x0), 1),
    ("softsign", lambda x0: F.softsign(x0), 1),
    ("tanhshrink", lambda x0: F.tanhshrink(x0), 1),
    ("threshold", lambda x0: F.threshold(x0, 0.5, -1.0), 1),
    ("silu_functional_sigmoid", lambda x0: x0 * F.sigmoid(x0) + F.tanh(x0), 1),
    # clamp spellings: min only, max only, both, None, methods
    ("clamp_min_kw", lambda x0: torch.clamp(x0, min=-1.5), 1),
    ("clamp_max_none", lambda x0: torch.clamp(x0, None, 2.5), 1),
    ("clamp_min_gt_max", lambda x0: torch.clamp(x0, 2.0, 1.0), 1),  # torch: max wins
    ("clip", lambda x0: torch.clip(x0, -1, 1), 1),
    ("clamp_min_max_methods", lambda x0: x0.clamp_min(-0.5) + x0.clamp_max(0.5), 1),
    ("maximum_minimum", lambda x0, x1: torch.maximum(x0, x1) - torch.minimum(x0, x1 * 2), 2),
    # arithmetic, operators and torch functions
    ("add_alpha", lambda x0, x1: x0.add(x1, alpha=2) + torch.add(x0, 3, alpha=0.5), 2),
    ("sub_alpha", lambda x0, x1: torch.sub(x0, x1, alpha=0.25) - x0.sub(1), 2),
    ("rsub", lambda x0: torch.rsub(x0, 1.0), 1),
    ("scalar_left", lambda x0: 2.5 - x0 + 3 * x0 - 1 / (2 + x0 * x0), 1),
    ("div", lambda x0, x1: x0.div(x1.abs() + 1) + torch.div(x0, 3) + torch.true_divide(x0, 7), 2),
    ("neg", lambda x0: -x0 + torch.neg(x0 * 2) + x0.neg(), 1),
    ("pow_int", lambda x0: x0**3 + x0.pow(2) + torch.pow(x0, -2.0), 1),
    ("pow_half", lambda x0: x0.abs() ** 0.5 + torch.pow(x0.abs() + 1, -0.5) + (x0.abs() + 1) ** 1.5, 1),
    ("pow_const_base", lambda x0: 2**x0 + torch.pow(0.5, x0.clamp(-10, 10)), 1),
    ("sqrt_rsqrt_reciprocal",
     lambda x0: torch.sqrt(x0.abs()) + torch.rsqrt(1 + x0 * x0) + torch.reciprocal(2 + x0.abs()), 1),
    ("abs", lambda x0: abs(x0) + torch.abs(x0) + x0.abs(), 1),
    # transcendental functions
    ("exp_log", lambda x0: torch.exp(x0.clamp(max=80)) + torch.log(1 + x0 * x0) + x0.exp().log1p(), 1),
    ("log1p_expm1", lambda x0: torch.log1p(x0.abs()) + torch.expm1(x0.clamp(max=80)), 1),
    ("sigmoid_tanh_erf", lambda x0: x0.sigmoid() + x0.tanh() + torch.erf(x0) + torch.special.expit(x0), 1),
    # comparisons as values and conditions
    ("where", lambda x0: torch.where(x0 > 0, x0, 0.1 * x0), 1),
    ("where_scalars", lambda x0, x1: torch.where(x0 >= x1, 1.0, -2.0) * x1, 2),
    ("mask_mul", lambda x0: x0 * (x0 > 0), 1),
    ("mask_float", lambda x0: (x0 < 1).float() * x0, 1),
    # in-place forms on intermediates nobody else reads
    ("inplace_kwarg", lambda x0: F.relu(x0 * 2, inplace=True), 1),
    ("inplace_method", lambda x0, x1: (x0 * 2).sigmoid_().mul_(x1), 2),
    ("inplace_operator", lambda x0, x1: _iadd(x0 * 1.5, x1), 2),
]


def _iadd(a, b):
    a += b
    return a


@pytest.mark.parametrize("fn,n_inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lift_matches_torch(fn, n_inputs):
    act = E.torch_fn(lift(fn, n_inputs), n_inputs)
    x32 = _inputs(n_inputs)
    x64 = [x.double() for x in x32]
    # Semantics, in float64: the expression and torch differ only by float64 roundings of the same math
    # (~1e-16 relative; constants are the same doubles), so any real difference shows.
    torch.testing.assert_close(act(*x64), fn(*x64), rtol=1e-12, atol=1e-12, equal_nan=True)
    # fp32, the precision the runtime evaluates in. rtol 1e-6 (8 ulp): the expression may fold constants
    # (1.702/2 -> 0.851) or reassociate sums and products, ~1 ulp each. The absolute term is for results that
    # cancel (1 + erf(x/sqrt(2)) at x = -5.4, x*x1 - x*x1/2 …): there each side is off by a few roundings of
    # an intermediate as large as (1+|x0|)(1+|x1|), not by ulps of the tiny result.
    got, eager = act(*x32), fn(*x32)
    scale = torch.ones_like(x32[0])
    for x in x32:
        scale = scale * (1 + x.abs())
    finite = torch.isfinite(eager)
    torch.testing.assert_close(got[~finite], eager[~finite], equal_nan=True)  # same inf/NaN pattern
    bound = 1e-6 * eager.abs() + 4 * 2.0**-23 * scale
    excess = ((got - eager).abs() - bound)[finite]
    worst = x32[0][finite][excess.argmax()].item()
    assert (excess <= 0).all(), f"exceeds the tolerance by {excess.max().item():.3g} at x0={worst}"


@pytest.mark.parametrize("fn,n_inputs,expected", [
    (CASES[0][1], 2, "x0*x1*sigmoid(x0)"),
    (CASES[2][1], 2, "(Min(7, Max(-7, x1)) + 1)*sigmoid(851*Min(7, x0)/500)*Min(7, x0)"),
    (CASES[6][1], 1, "Max(0, x0)"),
    (lambda x0: F.leaky_relu(x0), 1, "Piecewise((x0, x0 > 0), (x0/100, True))"),
    # casts and layout ops are the identity (see moefuse.passes.activation's docstring)
    (lambda x0: x0.float().half().bfloat16().double(), 1, "x0"),
    (lambda x0, x1: F.silu(x0.float()).to(torch.float32) * x1.type_as(x0).contiguous(), 2, "x0*x1*sigmoid(x0)"),
    (lambda x0: x0.to(dtype=torch.float16).clone() * 2, 1, "2*x0"),
])
def test_lift_expression(fn, n_inputs, expected):
    assert E.to_str(lift(fn, n_inputs)) == expected


def test_lift_stops_at_inputs():
    """The inputs may be computed nodes (slices of the up-projection), not only placeholders."""
    def glu(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    graphs = []
    torch._dynamo.reset()
    torch.compile(glu, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(torch.randn(4, 8))
    g = graphs[0].graph
    (chunk,) = [n for n in g.nodes if n.op in ("call_method", "call_function") and "chunk" in str(n.target)]
    gate, up = [n for n in g.nodes if n.op == "call_function" and n.target is operator.getitem and n.args[0] is chunk]
    (out,) = g.find_nodes(op="output")[0].args[0]
    assert lift_activation(out, {gate: X0, up: X1}) == X0 * X1 * E.sigmoid(X0)


# Rejections ---------------------------------------------------------------------------------------------

def _x0_times_w(x0, w):
    return x0 * w


REJECTED = [
    ("unknown_op", lambda x0: torch.sin(x0), 1, Reason.UNKNOWN_OP, "sin"),
    ("floordiv", lambda x0: x0 // 2, 1, Reason.UNKNOWN_OP, "floor division"),
    ("div_rounding", lambda x0, x1: torch.div(x0, x1, rounding_mode="floor"), 2, Reason.BAD_ARGUMENT, "rounding_mode"),
    ("clamp_tensor_bound", lambda x0, x1: torch.clamp(x0, min=x1), 2, Reason.NON_CONSTANT_ARGUMENT, "min"),
    ("pow_tensor_exponent", lambda x0, x1: x0**x1, 2, Reason.NON_CONSTANT_ARGUMENT, "exponent"),
    ("int_cast", lambda x0: x0.to(torch.int32) * 2, 1, Reason.NON_FLOAT, "int32"),
    ("comparison_result", lambda x0: x0 > 0, 1, Reason.NON_FLOAT, "comparison"),
    ("aliased_inplace", lambda x0: x0.mul_(2) + x0, 1, Reason.ALIASED_IN_PLACE, "also read by"),
    ("detach", lambda x0: x0.detach() * 2, 1, Reason.UNKNOWN_OP, "gradient"),
]


@pytest.mark.parametrize("fn,n_inputs,reason,words", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_lift_rejects(fn, n_inputs, reason, words):
    with pytest.raises(UnsupportedActivation) as info:
        lift(fn, n_inputs)
    assert info.value.reason is reason
    assert words in str(info.value) and "Hint:" in str(info.value)


def test_lift_rejects_foreign_tensor():
    """A tensor that is not an activation input (a learned scale) stops the walk at its placeholder."""
    graphs = []
    torch._dynamo.reset()
    torch.compile(_x0_times_w, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(
        torch.randn(4), torch.randn(4))
    x0_node, w_node = graphs[0].graph.find_nodes(op="placeholder")
    (out,) = graphs[0].graph.find_nodes(op="output")[0].args[0]
    with pytest.raises(UnsupportedActivation) as info:
        lift_activation(out, {x0_node: X0})
    assert info.value.reason is Reason.FOREIGN_INPUT and info.value.node is w_node


def test_unknown_op_message_names_op_and_alternatives():
    with pytest.raises(UnsupportedActivation) as info:
        lift(lambda x0: torch.sin(x0), 1)
    msg = str(info.value)
    assert "torch.sin" in msg and "supported_ops()" in msg
    assert {"silu", "gelu", "clamp", "softplus", "where", "to"} <= set(supported_ops())


# The expression language ---------------------------------------------------------------------------------

LANGUAGE_SAMPLES = [
    "silu(x0)*x1", "(clamp(x1,-7,7)+1)*clamp(x0,max=7)*sigmoid(1.702*clamp(x0,max=7))",
    "gelu(x0, approximate='tanh')*x1", "relu(x0)**2", "x0*tanh(softplus(x0))", "mish(x0)", "elu(x0, 0.5)",
    "logsigmoid(x0) + selu(x0)", "hardswish(x0)", "Heaviside(x0) + sign(x0)", "x0**(5/2)/(1 + x1**2)",
    "Piecewise((x0, (x0 > 0) & (x0 < 1)), (0, True))", "leaky_relu(x0, 0.2)", "2**x0 - pi*E",
]


@pytest.mark.parametrize("text", LANGUAGE_SAMPLES)
def test_round_trip(text):
    e = E.parse(text)
    canonical = E.to_str(e)
    assert E.parse(canonical) == e and E.to_str(E.parse(canonical)) == canonical


# Heaviside and sign are left out: their derivative is DiracDelta (see moefuse.expr's docstring)
@pytest.mark.parametrize("text", [t for t in LANGUAGE_SAMPLES if "Heaviside" not in t])
def test_derivatives_stay_in_language(text):
    """The backward kernel differentiates the expression: the derivative must print and evaluate too."""
    e = E.parse(text)
    for v in sorted(e.free_symbols, key=str):
        d = sympy.diff(e, v)
        canonical = E.to_str(d)
        assert E.to_str(E.parse(canonical)) == canonical
        assert E.torch_fn(d, 2)(*_inputs(2)).shape == (len(_EDGES) + 512,)


def test_custom_function_derivatives():
    x = X0
    assert sympy.diff(E.sigmoid(x), x) == E.sigmoid(x) * (1 - E.sigmoid(x))
    assert sympy.diff(E.log1p(x), x) == 1 / (1 + x)
    assert sympy.diff(E.expm1(x), x) == sympy.exp(x)
    for f, ref in ((E.sigmoid, torch.sigmoid), (E.log1p, torch.log1p), (E.expm1, torch.expm1)):
        expected = ref(torch.tensor(0.3, dtype=torch.float64)).item()
        assert float(f(sympy.Rational(3, 10)).evalf()) == pytest.approx(expected)  # evalf folds constants


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_const_is_exact(value):
    c = E.const(value)
    assert float(c) == value
    assert E.parse(E.to_str(c * X0 + 1)) == c * X0 + 1


@pytest.mark.parametrize("text,reason", [
    ("__import__('os').system('true')", "only the language's functions"),
    ("x0.real", "Attribute"),
    ("sin(x0)", "only the language's functions"),
    ("y + 1", "unknown name 'y'"),
    ("x0 > 1", "not a numeric expression"),
    ("x0 / 0", "not part of the expression language"),
    ("x0 + 1j", "not a number"),
    ("gelu(x0, approximate='fast')", "approximate"),
    ("x0 +", "syntax error"),
])
def test_parse_rejects(text, reason):
    with pytest.raises(E.ParseError, match=re.escape(reason)):
        E.parse(text)


def test_variables():
    assert E.variables(2) == (X0, X1) and X0.is_real and E.parse("x0") is X0
    with pytest.raises(E.ParseError):
        E.to_str(sympy.Symbol("x0") + 1)  # not the language's (real) x0


def test_torch_fn_keeps_dtype_and_caches():
    f = E.torch_fn("x0*x1*sigmoid(x0) + Piecewise((1, x0 > 0), (0, True))", 2)
    assert f is E.torch_fn(E.parse("x0*x1*sigmoid(x0) + Piecewise((1, x0 > 0), (0, True))"), 2)
    a, b = _inputs(2, torch.float16)
    out = f(a, b)
    assert out.dtype == torch.float16
    # the same ops in fp16 (torch_fn evaluates in the inputs' dtype): eager's numbers within two roundings
    want = F.silu(a) * b + (a > 0).half()
    ref = F.silu(a.double()) * b.double() + (a > 0).double()
    assert_parity(out, want, ref, torch.float16)
    assert E.torch_fn("sigmoid(0)", 1)(a).dtype == torch.float16  # a constant still yields a tensor


def test_torch_fn_structural_functions():
    x = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(E.torch_fn("Heaviside(x0) + sign(x0) + Abs(x0)", 1)(x), torch.tensor([1.0, 0.5, 5.0]))
    torch.testing.assert_close(E.torch_fn("Max(x0, 0, -1) + Min(x0, 1, 2)", 1)(x), torch.tensor([-2.0, 0.0, 4.0]))


def test_torch_fn_errors():
    with pytest.raises(E.ExprError, match="only 1 input"):
        E.torch_fn("x0*x1", 1)
    with pytest.raises(E.UnsupportedExpression, match="final"):
        E.torch_fn(sympy.Piecewise((X0, X0 > 0)), 1)
    with pytest.raises(TypeError, match="takes 2"):
        E.torch_fn("x0*x1", 2)(torch.ones(1))


@pytest.mark.parametrize("fn,text", [
    (torch.nn.functional.relu, "relu(x0)"),  # slope 0 at 0 (x > 0)
    (lambda x: x.clamp(-7.0, 7.0), "clamp(x0, -7, 7)"),  # slope 1 on both bounds (inclusive)
    (lambda x: torch.nn.functional.silu(x.clamp(max=7.0)), "silu(clamp(x0, max=7))"),
])
def test_gradient_slope_at_kinks_matches_torch(fn, text):
    x = torch.tensor([-8.0, -7.0, -1.0, 0.0, 1.0, 7.0, 8.0], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(fn(x).sum(), x)
    (d,) = E.gradient(text, 1)
    torch.testing.assert_close(E.torch_fn(d, 1)(x.detach()), expected, rtol=0, atol=1e-12)
