"""The activation expression language: elementwise sympy expressions over the variables x0, x1, ….

An expert's activation is read from the graph as one of these expressions (`moefuse.passes.activation`),
stored in the spec as its canonical string (`to_str`), printed as the GEMM epilogue
(`moefuse.kernels.codegen`) and, for backward, differentiated with sympy. So an expression must be:
  - canonical: `to_str` gives one string per expression (a fixed point of parse-then-print), since the
    string keys caches;
  - differentiable: every function in it has an `fdiff`. Derivatives stay in the language except where
    they would need DiracDelta (the derivative of Heaviside or sign, i.e. second derivatives of Max/Min/Abs),
    which torch's autograd treats as 0;
  - printable both as torch code (`torch_fn`, the CPU path and the reference) and as Triton code.

Vocabulary (`FUNCTIONS`) and why each entry is what it is:
  sigmoid       custom Function. sympy would spell it 1/(1+exp(-x)); keeping it whole prints as the one
                saturating `torch.sigmoid` / `tl.sigmoid` and differentiates to sigmoid·(1−sigmoid), which
                reuses the forward value instead of exp(-x)/(1+exp(-x))².
  log1p, expm1  custom Functions: log(1+x) and exp(x)−1 lose all digits for |x| < 1e-7 in fp32, and torch
                computes softplus/mish/logsigmoid/elu with log1p/expm1; the Triton printer emits accurate
                helpers for them.
  exp, log, tanh, erf, Abs, sign, Max, Min, Heaviside, Piecewise
                sympy builtins: they already print, differentiate (d Max(0, x) = Heaviside(x)) and simplify.
  sqrt          sympy's Pow(x, 1/2); printed as a correctly rounded sqrt.
Torch activations are not functions of the language but formulas in it (`silu`, `gelu`, `softplus`, … below,
each with torch's exact semantics and defaults): the kernels never need a fixed list of activations, and
`parse` accepts these names as sugar that expands on the spot.

Variables are real symbols: tensors hold reals, and sympy needs that to differentiate Abs/Max/Min without
complex-conjugate terms. Numbers are exact: a Python float f becomes Rational(repr(f)) (1.702 -> 851/500), so
strings round-trip without precision suffixes and `float()` gives back the same double.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
import re
from collections.abc import Callable

import sympy
import torch

__all__ = [
    "ExprError", "ParseError", "UnsupportedExpression",
    "sigmoid", "log1p", "expm1", "FUNCTIONS",
    "variables", "const", "parse", "to_str", "torch_fn",
    "silu", "relu", "relu6", "clamp", "gelu", "softplus", "mish", "leaky_relu", "elu", "celu", "selu",
    "hardtanh", "hardsigmoid", "hardswish", "logsigmoid", "softsign", "tanhshrink", "threshold",
]


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class ExprError(ValueError):
    """Base class of the expression language's errors."""


class ParseError(ExprError):
    """`text` is not an expression of the language."""

    def __init__(self, text: str, reason: str):
        self.text, self.reason = text, reason
        super().__init__(
            f"cannot parse activation expression {text!r}: {reason}. An expression is arithmetic and "
            f"comparisons over x0, x1, …, pi, E with the functions "
            f"{', '.join(sorted(n for n, f in _PARSE_NAMES.items() if callable(f)))}"
        )


class UnsupportedExpression(ExprError):
    """A part of an expression has no translation for `backend` ("torch" or "triton")."""

    def __init__(self, expr, part, backend: str, hint: str = ""):
        self.expr, self.part, self.backend = expr, part, backend
        hint = hint or (
            f"the {backend} printer supports {', '.join(sorted(f.__name__ for f in FUNCTIONS))} and arithmetic; "
            "express the activation with those, or add the function to moefuse.expr.FUNCTIONS and both printers"
        )
        super().__init__(f"cannot translate {part} (in activation {expr}) to {backend}: {hint}")


# ---------------------------------------------------------------------------------------------------------
# Functions sympy lacks
# ---------------------------------------------------------------------------------------------------------


class sigmoid(sympy.Function):
    """1/(1+exp(-x)), kept whole (see module docstring)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.S.Half
        return None

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sympy.exp(-x))

    def _eval_evalf(self, prec):
        return self.rewrite(sympy.exp)._eval_evalf(prec)


class log1p(sympy.Function):
    """log(1+x) without the cancellation of forming 1+x."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.S.Zero
        return None

    def fdiff(self, argindex=1):
        return 1 / (1 + self.args[0])

    def _eval_rewrite_as_log(self, x, **kwargs):
        return sympy.log(1 + x)

    def _eval_evalf(self, prec):
        return self.rewrite(sympy.log)._eval_evalf(prec)


class expm1(sympy.Function):
    """exp(x)−1 without the cancellation of subtracting 1."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.S.Zero
        return None

    def fdiff(self, argindex=1):
        return sympy.exp(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sympy.exp(x) - 1

    def _eval_evalf(self, prec):
        return self.rewrite(sympy.exp)._eval_evalf(prec)


# Every function an expression may contain; both printers (torch here, Triton in kernels/codegen.py) must
# cover exactly this set, which tests check. Derivatives stay inside it: d tanh = 1−tanh², d erf = exp·const,
# d Abs = sign, d Max/Min = Heaviside, d Piecewise = Piecewise.
FUNCTIONS: frozenset[type] = frozenset({
    sigmoid, log1p, expm1, sympy.exp, sympy.log, sympy.tanh, sympy.erf,
    sympy.Abs, sympy.sign, sympy.Max, sympy.Min, sympy.Heaviside, sympy.Piecewise,
})


# ---------------------------------------------------------------------------------------------------------
# Variables and constants
# ---------------------------------------------------------------------------------------------------------

_VAR_NAME = re.compile(r"x(0|[1-9][0-9]*)\Z")


@functools.lru_cache(maxsize=None)
def _var(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"x{i}", real=True)


def variables(n: int) -> tuple[sympy.Symbol, ...]:
    """The variables x0 … x{n-1} (real symbols; `parse` produces the same objects)."""
    return tuple(_var(i) for i in range(n))


def const(value) -> sympy.Expr:
    """An exact sympy number for a constant found in a graph or a formula's parameter.

    A float f becomes Rational(repr(f)): exact, printed without precision noise, and float() of it is f
    again. Booleans, non-finite values and anything that is not a real number are refused.
    """
    if isinstance(value, bool):
        raise ExprError(f"{value!r} is a boolean, not a number")
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExprError(f"constant {value!r} is not finite")
        return sympy.Rational(repr(value))
    if isinstance(value, sympy.Float):
        return const(float(value))
    if isinstance(value, sympy.Expr) and value.is_number and value.is_real and value.is_finite:
        return value
    raise ExprError(f"{value!r} ({type(value).__name__}) is not a finite real constant")


# ---------------------------------------------------------------------------------------------------------
# Torch activations as formulas, with torch's semantics and defaults (ATen's CPU kernels are the reference)
# ---------------------------------------------------------------------------------------------------------


def relu(x):
    return sympy.Max(0, x)


def clamp(x, min=None, max=None):  # noqa: A002 - torch's parameter names
    if min is None and max is None:
        raise ExprError("clamp needs at least one of min and max")
    if min is not None:
        x = sympy.Max(x, const(min))
    if max is not None:
        x = sympy.Min(x, const(max))  # applied last: torch gives `max` when min > max
    return x


def hardtanh(x, min_val=-1.0, max_val=1.0):
    return clamp(x, min_val, max_val)


def relu6(x):
    return clamp(x, 0, 6)


def silu(x):
    return x * sigmoid(x)


def gelu(x, approximate="none"):
    if approximate == "none":
        return x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2
    if approximate == "tanh":
        # ATen: kBeta = sqrt(2)·(2/sqrt(pi))·0.5, kKappa = 0.044715
        inner = sympy.sqrt(2) / sympy.sqrt(sympy.pi) * (x + const(0.044715) * x**3)
        return x * (1 + sympy.tanh(inner)) / 2
    raise ExprError(f"gelu approximate={approximate!r}; torch accepts 'none' or 'tanh'")


def softplus(x, beta=1, threshold=20):
    # ATen reverts to the identity where x·beta > threshold, for the same reason exp would overflow.
    beta, threshold = const(beta), const(threshold)
    return sympy.Piecewise((x, x * beta > threshold), (log1p(sympy.exp(beta * x)) / beta, True))


def mish(x):
    return x * sympy.tanh(log1p(sympy.exp(x)))  # ATen: no softplus threshold here


def leaky_relu(x, negative_slope=0.01):
    return sympy.Piecewise((x, x > 0), (const(negative_slope) * x, True))


def elu(x, alpha=1.0):
    return sympy.Piecewise((x, x > 0), (const(alpha) * expm1(x), True))


def celu(x, alpha=1.0):
    alpha = const(alpha)
    return sympy.Piecewise((x, x > 0), (alpha * expm1(x / alpha), True))


def selu(x):
    # ATen's double constants
    alpha, scale = const(1.6732632423543772848170429916717), const(1.0507009873554804934193349852946)
    return scale * elu(x, alpha)


def hardsigmoid(x):
    return clamp(x + 3, 0, 6) / 6


def hardswish(x):
    return x * clamp(x + 3, 0, 6) / 6


def logsigmoid(x):
    return sympy.Min(0, x) - log1p(sympy.exp(-sympy.Abs(x)))  # ATen's overflow-free form


def softsign(x):
    return x / (1 + sympy.Abs(x))


def tanhshrink(x):
    return x - sympy.tanh(x)


def threshold(x, threshold, value):  # noqa: A002
    return sympy.Piecewise((x, x > const(threshold)), (const(value), True))


# ---------------------------------------------------------------------------------------------------------
# Strings: parse / to_str
# ---------------------------------------------------------------------------------------------------------

_SUGAR: dict[str, Callable] = {
    f.__name__: f for f in (silu, relu, relu6, clamp, gelu, softplus, mish, leaky_relu, elu, celu, selu,
                            hardtanh, hardsigmoid, hardswish, logsigmoid, softsign, tanhshrink, threshold)
}
_PARSE_NAMES: dict[str, object] = {
    **{f.__name__: f for f in FUNCTIONS}, "sqrt": sympy.sqrt, "pi": sympy.pi, "E": sympy.E, **_SUGAR,
}
_AST_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.keyword, ast.Name, ast.Load,
    ast.Constant, ast.Tuple, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd,
    ast.Gt, ast.Lt, ast.GtE, ast.LtE, ast.Eq, ast.NotEq, ast.BitAnd, ast.BitOr, ast.Invert,
)


def _check_syntax(text: str) -> None:
    """Whitelist the Python syntax before sympy evaluates the string: spec strings arrive from cache files
    and custom-op arguments, and sympy's parser ends in eval()."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ParseError(text, f"syntax error ({e.msg})") from None
    options = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword)}  # gelu(x0, approximate="tanh")
    for node in ast.walk(tree):
        if not isinstance(node, _AST_NODES):
            raise ParseError(text, f"`{type(node).__name__}` syntax is not allowed")
        if isinstance(node, ast.Name) and node.id not in _PARSE_NAMES and not _VAR_NAME.match(node.id):
            raise ParseError(text, f"unknown name {node.id!r}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _PARSE_NAMES):
            raise ParseError(text, "only the language's functions may be called")
        if isinstance(node, ast.Constant) and type(node.value) not in (int, float, bool) and id(node) not in options:
            raise ParseError(text, f"constant {node.value!r} is not a number")
        # sympy evaluates integer arithmetic exactly as it parses: 9**9**9 would not finish. Printed
        # expressions hold at most the digits of an exact double (~330) and no power of a power of constants.
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) >= 10**400:
            raise ParseError(text, "integer constant too large")
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
                and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.right))):
            raise ParseError(text, "a power in an exponent")


def _exact(expr):
    """Floats -> exact rationals (see `const`), so a hand-written '1.702' and the graph's 1.702 agree."""
    floats = expr.atoms(sympy.Float)
    return expr.xreplace({f: const(f) for f in floats}) if floats else expr


_STRUCTURE = (
    sympy.Add, sympy.Mul, sympy.Pow, sympy.Rational, sympy.NumberSymbol, sympy.core.relational.Relational,
    sympy.And, sympy.Or, sympy.Not, sympy.logic.boolalg.BooleanAtom, sympy.functions.elementary.piecewise.ExprCondPair,
)


def _check_expr(expr, text) -> None:
    """Refuse what would break the round trip or the printers (a foreign function, an unevaluated
    Derivative, a complex or non-finite number, a variable that is not one of ours)."""
    if not isinstance(expr, sympy.Expr):
        raise ParseError(text, f"it is a {type(expr).__name__}, not a numeric expression")
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Symbol):
            if not (_VAR_NAME.match(node.name) and node == _var(int(node.name[1:]))):
                raise ParseError(text, f"{node!r} is not one of the language's variables x0, x1, … (real symbols)")
        elif isinstance(node, _STRUCTURE):
            continue
        elif isinstance(node, sympy.core.function.Application):
            if type(node) not in FUNCTIONS:
                raise ParseError(text, f"function {type(node).__name__} is not in moefuse.expr.FUNCTIONS")
        else:
            raise ParseError(text, f"{node} ({type(node).__name__}) is not part of the expression language")


def parse(text: str) -> sympy.Expr:
    """The expression spelled by `text` (canonical or not; torch activation names are accepted as sugar).
    For every parsed `e`, `parse(to_str(e)) == e`."""
    _check_syntax(text)
    names = dict(_PARSE_NAMES)
    names.update({n.id: _var(int(n.id[1:])) for n in ast.walk(ast.parse(text, mode="eval"))
                  if isinstance(n, ast.Name) and _VAR_NAME.match(n.id)})
    try:
        expr = sympy.parse_expr(text, local_dict=names, global_dict={"__builtins__": {}, **_sympy_core()})
    except (ExprError, TypeError, ValueError, SyntaxError, AttributeError) as e:
        raise ParseError(text, f"{type(e).__name__}: {e}") from None
    expr = _exact(expr)
    _check_expr(expr, text)
    return expr


@functools.lru_cache(maxsize=1)
def _sympy_core() -> dict:
    # What sympy's auto_number / auto_symbol transformations reference in the code they generate.
    return {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational, "Symbol": sympy.Symbol,
            "true": sympy.true, "false": sympy.false, "True": True, "False": False}


def to_str(expr: sympy.Expr) -> str:
    """The canonical string of `expr`: the one used in MoESpec.Activation.expr and in cache keys.

    It is the string of `parse(sstr(expr))`, not of `expr` itself: sympy builds some trees (a derivative's
    `851*(1 - sigmoid(…))`) that its own parser, which evaluates as it goes, never produces
    (`851 - 851*sigmoid(…)`); printing the re-parsed tree makes equal strings for the two spellings and
    makes the string a fixed point: `to_str(parse(to_str(e))) == to_str(e)`, and for a parsed `e`,
    `parse(to_str(e)) == e`.
    """
    text = sympy.sstr(expr, order=None)
    _check_expr(expr, text)
    return sympy.sstr(parse(text), order=None)


# ---------------------------------------------------------------------------------------------------------
# Torch evaluation
# ---------------------------------------------------------------------------------------------------------

# One torch op per function of the language; structural nodes (Add, Mul, Pow, Max, …) are in _compile.
_TORCH_UNARY: dict[type, Callable] = {
    sigmoid: torch.sigmoid, log1p: torch.log1p, expm1: torch.expm1, sympy.exp: torch.exp,
    sympy.log: torch.log, sympy.tanh: torch.tanh, sympy.erf: torch.erf, sympy.Abs: torch.abs,
    sympy.sign: torch.sign,
}
_TORCH_COMPARE: dict[type, Callable] = {
    sympy.StrictGreaterThan: operator.gt, sympy.StrictLessThan: operator.lt, sympy.GreaterThan: operator.ge,
    sympy.LessThan: operator.le, sympy.Equality: operator.eq, sympy.Unequality: operator.ne,
}
_TORCH_LOGIC: dict[type, Callable] = {sympy.And: operator.and_, sympy.Or: operator.or_}

_Thunk = Callable[[tuple], object]  # inputs -> tensor, bool tensor, or Python scalar


def _tensor(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar as a 0-d tensor of `like`'s dtype, so torch.where/maximum keep the inputs' dtype."""
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _split_fraction(expr: sympy.Mul) -> tuple[list, list]:
    """Factors of a product as (numerator, denominator): x*y**-2 -> ([x], [y**2]); division, not
    multiplication by a reciprocal, is what torch code (and the graph it came from) does."""
    num, den = [], []
    for f in expr.args:
        if f.is_Pow and f.exp.is_number and f.exp.is_negative and not f.is_number:
            den.append(f.base ** -f.exp)
        else:
            num.append(f)
    return num, den


def _reduce(f, thunks) -> _Thunk:
    return lambda xs: functools.reduce(f, (a(xs) for a in thunks))


def _compile(e, expr: str) -> _Thunk:
    """`e` (a subtree of `expr`) as a function of the input tuple, built once per expression."""
    if isinstance(e, sympy.Symbol):
        i = int(e.name[1:])
        return lambda xs: xs[i]
    if isinstance(e, sympy.logic.boolalg.BooleanAtom):
        b = bool(e)
        return lambda xs: b
    if isinstance(e, sympy.Expr) and e.is_number:
        c = float(e.evalf(30))
        if not math.isfinite(c):
            raise UnsupportedExpression(expr, e, "torch", "the constant is not finite")
        return lambda xs: c
    t = type(e)
    if t in _TORCH_UNARY:
        f, a = _TORCH_UNARY[t], _compile(e.args[0], expr)
        return lambda xs: f(a(xs))
    if t in _TORCH_COMPARE:
        f, a, b = _TORCH_COMPARE[t], _compile(e.lhs, expr), _compile(e.rhs, expr)
        return lambda xs: f(a(xs), b(xs))
    if t in _TORCH_LOGIC:
        return _reduce(_TORCH_LOGIC[t], [_compile(a, expr) for a in e.args])
    if t is sympy.Not:
        a = _compile(e.args[0], expr)
        return lambda xs: ~a(xs)
    if t is sympy.Add:
        return _reduce(operator.add, [_compile(a, expr) for a in e.args])
    if t is sympy.Mul:
        num, den = _split_fraction(e)
        top = _reduce(operator.mul, [_compile(a, expr) for a in num])
        if not den:
            return top
        bottom = _reduce(operator.mul, [_compile(a, expr) for a in den])
        return lambda xs: top(xs) / bottom(xs)
    if t is sympy.Pow:
        return _compile_pow(e, expr)
    if t in (sympy.Max, sympy.Min):
        return _compile_lattice(e, expr)
    if t is sympy.Piecewise:
        return _compile_piecewise(e, expr)
    if t is sympy.Heaviside:
        a, h0 = (_compile(arg, expr) for arg in e.args)

        def heaviside(xs):
            x, like = a(xs), xs[0]
            return torch.where(x > 0, _tensor(1.0, like), torch.where(x < 0, _tensor(0.0, like), _tensor(h0(xs), like)))
        return heaviside
    raise UnsupportedExpression(expr, e, "torch")


def _compile_pow(e: sympy.Pow, expr: str) -> _Thunk:
    # The special exponents are torch's own fast paths for x**0.5, x**-0.5, x**-1 (pow_tensor_scalar)
    base = _compile(e.base, expr)
    special = {sympy.S.Half: torch.sqrt, -sympy.S.Half: torch.rsqrt, sympy.S.NegativeOne: torch.reciprocal}
    if e.exp in special:
        f = special[e.exp]
        return lambda xs: f(base(xs))
    if e.exp.is_Integer:
        n = int(e.exp)
        return lambda xs: torch.pow(base(xs), n)
    exp = _compile(e.exp, expr)
    return lambda xs: torch.pow(base(xs), exp(xs))


def _compile_lattice(e, expr: str) -> _Thunk:
    # torch.maximum needs two tensors; constants go through clamp_min/clamp_max, which keep the dtype
    is_max = type(e) is sympy.Max
    tensor_op, scalar_op, pick = ((torch.maximum, torch.clamp_min, max) if is_max
                                  else (torch.minimum, torch.clamp_max, min))
    consts = [float(a) for a in e.args if a.is_number]
    terms = _reduce(tensor_op, [_compile(a, expr) for a in e.args if not a.is_number])
    if not consts:
        return terms
    bound = pick(consts)
    return lambda xs: scalar_op(terms(xs), bound)


def _compile_piecewise(e: sympy.Piecewise, expr: str) -> _Thunk:
    if e.args[-1].cond is not sympy.true:
        raise UnsupportedExpression(expr, e, "torch", "a Piecewise needs a final (value, True) branch")
    pairs = [(_compile(p.expr, expr), _compile(p.cond, expr)) for p in e.args]

    def piecewise(xs):
        like = xs[0]
        r = _tensor(pairs[-1][0](xs), like)
        for value, cond in reversed(pairs[:-1]):
            r = torch.where(cond(xs), _tensor(value(xs), like), r)
        return r
    return piecewise


@functools.lru_cache(maxsize=None)
def _torch_fn_cached(key: str, n_inputs: int) -> Callable[..., torch.Tensor]:
    expr = parse(key)
    extra = {s for s in expr.free_symbols if int(s.name[1:]) >= n_inputs}
    if extra:
        raise ExprError(f"activation {key} reads {sorted(map(str, extra))} but has only {n_inputs} input(s)")
    run = _compile(expr, key)

    def activation(*xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != n_inputs:
            raise TypeError(f"activation {key} takes {n_inputs} tensor(s), got {len(xs)}")
        r = run(xs)
        return r if isinstance(r, torch.Tensor) else torch.full_like(xs[0], r)

    activation.__qualname__ = activation.__name__ = f"activation[{key}]"
    return activation


def torch_fn(expr: sympy.Expr | str, n_inputs: int) -> Callable[..., torch.Tensor]:
    """`expr` as a function of `n_inputs` tensors, evaluated with torch ops in the tensors' dtype (upcast
    before calling for fp32 math). Cached per canonical expression string."""
    key = to_str(expr) if isinstance(expr, sympy.Basic) else to_str(parse(expr))
    return _torch_fn_cached(key, n_inputs)


# ---------------------------------------------------------------------------------------------------------
# Derivatives (the fused backward's epilogue is generated from these)
# ---------------------------------------------------------------------------------------------------------


class _bound(sympy.Function):
    """Max(c, f) / Min(c, f) with a constant c while differentiating, so the slope at f == c can follow torch:
    `_bound(f, c, 1)` is Max (a lower bound), `_bound(f, c, -1)` is Min (an upper bound)."""

    nargs = 3

    def fdiff(self, argindex=1):
        if argindex != 1:
            return sympy.S.Zero
        f, c, side = self.args
        # torch: relu's slope at 0 is 0 (x > 0); clamp's at a bound is 1 (min <= x <= max, inclusive). A lower
        # bound of exactly 0 is taken to be a relu (which F.relu and clamp(min=0) both lift to).
        at_kink = sympy.S.Zero if (side == 1 and c == 0) else sympy.S.One
        return sympy.Heaviside(side * (f - c), at_kink)


def _with_bounds(e: sympy.Expr) -> sympy.Expr:
    def bound(cls, side):
        def rewrite(node):
            consts = [a for a in node.args if a.is_number]
            rest = [a for a in node.args if not a.is_number]
            if len(consts) != 1 or len(rest) != 1:
                return node
            return _bound(rest[0], consts[0], side)
        return rewrite

    e = e.replace(lambda a: isinstance(a, sympy.Max), bound(sympy.Max, 1))
    return e.replace(lambda a: isinstance(a, sympy.Min), bound(sympy.Min, -1))


def _without_bounds(e: sympy.Expr) -> sympy.Expr:
    return e.replace(lambda a: isinstance(a, _bound),
                     lambda a: sympy.Max(a.args[1], a.args[0]) if a.args[2] == 1 else sympy.Min(a.args[1], a.args[0]))


def gradient(expr: sympy.Expr | str, n_inputs: int) -> tuple[sympy.Expr, ...]:
    """∂expr/∂x_j for j < n_inputs, each again an expression of the language.

    Kinks follow torch's autograd: the derivative of a step (Heaviside, sign) is 0 everywhere — sympy says
    DiracDelta, which only the second derivative of Max/Min/Abs/clamp can produce. At a constant bound the
    slope is torch's: 1 on a clamp bound (inclusive), 0 for relu at 0 (`_bound`); between two variables
    (torch.maximum) it is sympy's 1/2, which is also torch's.
    """
    e = _with_bounds(parse(expr) if isinstance(expr, str) else expr)
    grads = []
    for x in variables(n_inputs):
        d = sympy.diff(e, x).replace(lambda a: isinstance(a, sympy.DiracDelta), lambda a: sympy.S.Zero)
        grads.append(parse(to_str(_without_bounds(d))))
    return tuple(grads)
