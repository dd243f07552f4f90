"""Print an activation expression (`moefuse.expr`) as a `@triton.jit` function, and load it; or as C functions
(`c_source`) for the CPU kernels (`moefuse.kernels.cpu`), by the same printer with C spellings (`_CPrinter`).

`triton_source(expr, n)` is a complete module: the helpers the expression needs, then

    @triton.jit
    def activation(x0, x1):
        t0 = tl.minimum(x0, 7.0, propagate_nan=tl.PropagateNan.ALL)
        return ...

which GEMM epilogues call on fp32 tiles (the function is passed to kernels as a `tl.constexpr` argument).
Everything is evaluated in fp32: constants are fp32 literals, integer powers are products, common
subexpressions are bound once (the interpreter does not CSE; the GPU compiler would anyway).

Printing choices, each for torch parity or portability (the same source must run on NVIDIA, AMD and under
TRITON_INTERPRET=1, so nothing from `tl.extra.*`):
  sigmoid -> tl.sigmoid          1/(1+exp(-x)): saturates to 0/1, never inf/inf.
  exp, log, erf, abs -> tl.*     all core Triton; tl.log is libdevice's accurate logf on NVIDIA, tl.exp the
                                 fast ex2.approx (~2 ulp).
  sqrt -> tl.sqrt_rn             correctly rounded like torch.sqrt (tl.sqrt is the approximate one).
  Max/Min -> tl.maximum/minimum with PropagateNan.ALL: torch's clamp/relu propagate NaN; silently turning a
                                 NaN into a bound would hide a diverging model.
  Piecewise -> nested tl.where;  Heaviside, sign -> helpers of tl.where.
  tanh, log1p, expm1 -> helpers  core Triton has none of them; see the helpers for their accuracy.
  x**n (integer |n| <= 64) -> products; x**(k/2) -> products and tl.sqrt_rn; other real exponents and
                                 positive constant bases -> tl.exp2(e·log2 b), NaN for a negative base as
                                 in torch.pow.
Anything else raises `moefuse.expr.UnsupportedExpression`.

`load_activation(expr_str, n)` writes the module into the kernel cache directory (Triton reads a jit
function's source back with `inspect`, so it must be a real file) and imports it. `triton_grad_source` /
`load_activation_grad` do the same for the backward's epilogue: one function returning the activation and its
partial derivatives (`moefuse.expr.gradient`), printed by the same printer with shared subexpressions.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from moefuse import expr as E

__all__ = ["triton_source", "triton_grad_source", "c_source", "load_activation", "load_activation_grad", "cache_dir",
           "HELPERS"]

_MAX_INT_POWER = 64  # x**n is n-1 multiplies; beyond this nobody meant an activation

# name -> (source, helpers it calls). The error bounds are measured (tests/test_codegen.py::test_helper_accuracy)
# against float64 torch on a dense grid over [-30, 30] plus ±[1e-30, 10] log-spaced, under the interpreter.
# They rest on tl.log being accurate near 1, which holds on NVIDIA too: Triton inlines libdevice's logf
# (a polynomial, ~1 ulp), while tl.exp is ex2.approx (~2 ulp), an error the tricks below absorb.
HELPERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "_expm1": ('''\
@triton.jit
def _expm1(x):
    # exp(x) - 1 cancels for |x| < 0.5; there Kahan's (u - 1) * x / log(u), u = fl(exp(x)), divides the
    # rounding error of u back out. u == 1 means expm1(x) == x in fp32. Max error 5 ulp.
    u = tl.exp(x)
    d = u - 1.0
    small = tl.where(d == 0.0, x, d * (x / tl.log(u)))
    return tl.where(tl.abs(x) < 0.5, small, d)
''', ()),
    "_log1p": ('''\
@triton.jit
def _log1p(x):
    # Forming 1 + x drops the low bits of x for |x| < 0.5; Goldberg's log(u) * x / (u - 1), u = fl(1 + x),
    # corrects for exactly that rounding. u == 1 means log1p(x) == x in fp32. Max error 5 ulp.
    u = 1.0 + x
    d = u - 1.0
    small = tl.where(d == 0.0, x, tl.log(u) * (x / d))
    return tl.where(tl.abs(x) < 0.5, small, tl.log(u))
''', ()),
    "_tanh": ('''\
@triton.jit
def _tanh(x):
    # tanh = e / (e + 2) with e = expm1(2x): no cancellation for either sign. |x| is capped at 10, where
    # tanh rounds to +-1 in fp32, so e never reaches inf (inf / inf). Max error 6 ulp.
    c = tl.minimum(tl.maximum(x, -10.0, propagate_nan=tl.PropagateNan.ALL), 10.0,
                   propagate_nan=tl.PropagateNan.ALL)
    e = _expm1(2.0 * c)
    return e / (e + 2.0)
''', ("_expm1",)),
    "_sign": ('''\
@triton.jit
def _sign(x):
    return tl.where(x < 0.0, -1.0, tl.where(x > 0.0, 1.0, x))  # keeps 0 and NaN, like torch.sign
''', ()),
    "_heaviside": ('''\
@triton.jit
def _heaviside(x, h0):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, 0.0, h0))
''', ()),
}

_NAN_ALL = "propagate_nan=tl.PropagateNan.ALL"


class _TritonPrinter(StrPrinter):
    """sympy -> Triton expression text. Records the helpers it used in `self.helpers`."""

    HELPERS = frozenset(HELPERS)  # names a generated function may not take

    def __init__(self, expr_text: str, temps: Iterator[sympy.Symbol]):
        super().__init__()
        self.expr_text = expr_text
        self.temps = temps  # names for values bound by the printer itself (after cse's)
        self.helpers: set[str] = set()
        self.lines: list[str] = []  # the function body so far

    def assign(self, name: str, e) -> None:
        rhs = self._print(e)  # may bind temps of its own first
        self.lines.append(f"    {name} = {rhs}")

    def result(self, body) -> str:
        """The printed value of an output; a constant becomes a tile, which is what the kernel stores."""
        result = self._print(body)
        return f"tl.zeros_like(x0) + {result}" if not body.free_symbols else result

    def _bind(self, e) -> str:
        name = str(next(self.temps))
        self.assign(name, e)
        return name

    def _unsupported(self, e, hint: str = ""):
        raise E.UnsupportedExpression(self.expr_text, e, "triton", hint)

    def _print(self, e, **kwargs):
        # Fold every numeric subtree into one fp32 literal, so sqrt(2)/sqrt(pi) costs no runtime op.
        if isinstance(e, sympy.Expr) and e.is_number:
            return self._literal(e)
        return super()._print(e, **kwargs)

    def _literal(self, e) -> str:
        value = complex(e.evalf(30))
        if value.imag or value.real != value.real or value.real in (float("inf"), float("-inf")):
            self._unsupported(e, "the constant is not a finite real number")
        return repr(value.real)

    def _call(self, name: str, *args) -> str:
        if name in HELPERS:
            self.helpers.add(name)
        return f"{name}({', '.join(self._print(a) for a in args)})"

    # Arithmetic ------------------------------------------------------------------------------------------

    def _factor(self, e) -> str:
        """`e` as a factor of a product: parenthesized unless it binds tighter than `*`."""
        return self.parenthesize(e, PRECEDENCE["Mul"], strict=True)

    def _print_Add(self, expr, order=None):
        terms = [self._print(t) for t in self._as_ordered_terms(expr, order="none") if not t.is_number]
        constant = sympy.Add(*(t for t in expr.args if t.is_number))
        if constant != 0:
            terms.append(self._literal(constant))
        out = terms[0]
        for t in terms[1:]:
            out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
        return out

    def _print_Mul(self, expr):
        coeff = sympy.Mul(*(a for a in expr.args if a.is_number))
        num, den = [], []
        for f in (a for a in expr.args if not a.is_number):
            if f.is_Pow and f.exp.is_number and f.exp.is_negative:
                den.append(f.base ** -f.exp)
            else:
                num.append(f)
        parts = [self.parenthesize(f, PRECEDENCE["Mul"]) for f in num]
        sign = ""
        if coeff == -1:
            sign = "-"
        elif coeff != 1:
            parts.insert(0, self._literal(coeff))
        out = "*".join(parts) or "1.0"
        if den:
            out += "/" + (self._factor(den[0]) if len(den) == 1 else "(" + "*".join(map(self._factor, den)) + ")")
        return sign + out

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.base, expr.exp
        if exp.is_number and exp.is_real:
            if (2 * exp).is_Integer and abs(exp) <= _MAX_INT_POWER:
                whole = int(abs(exp))  # x**(5/2) = x*x*sqrt(x)
                if whole >= 2 and not base.is_Symbol:  # print a compound base once
                    factor = plain = self._bind(base)
                else:
                    factor, plain = self._factor(base), self._print(base)
                factors = [factor] * whole
                if not (2 * exp).is_even:
                    factors.append(f"tl.sqrt_rn({plain})")
                product = factors[0] if len(factors) == 1 else "(" + "*".join(factors) + ")"
                return product if exp > 0 else f"(1.0/{product})"
            if exp.is_Integer:
                self._unsupported(expr, f"integer exponents above {_MAX_INT_POWER} are not printed as products")
            return f"tl.exp2({self._literal(exp)}*tl.log2({self._print(base)}))"
        if base.is_number and base.is_positive:
            return f"tl.exp2({self._print(sympy.Mul(sympy.log(base, 2), exp))})"
        self._unsupported(expr, "a power needs a constant exponent or a positive constant base")

    # Functions -------------------------------------------------------------------------------------------

    def _print_sigmoid(self, e):
        return self._call("tl.sigmoid", *e.args)

    def _print_exp(self, e):
        return self._call("tl.exp", *e.args)

    def _print_log(self, e):
        if len(e.args) != 1:
            self._unsupported(e, "log with a base")
        return self._call("tl.log", *e.args)

    def _print_erf(self, e):
        return self._call("tl.erf", *e.args)

    def _print_Abs(self, e):
        return self._call("tl.abs", *e.args)

    def _print_tanh(self, e):
        return self._call("_tanh", *e.args)

    def _print_log1p(self, e):
        return self._call("_log1p", *e.args)

    def _print_expm1(self, e):
        return self._call("_expm1", *e.args)

    def _print_sign(self, e):
        return self._call("_sign", *e.args)

    def _print_Heaviside(self, e):
        return self._call("_heaviside", *e.args)

    # The spellings the C printer changes: NaN-propagating max/min of two values, and a select.
    _LATTICE = {"max": "tl.maximum", "min": "tl.minimum"}

    def _pair(self, fn: str, a: str, b: str) -> str:
        return f"{fn}({a}, {b}, {_NAN_ALL})"

    def _select(self, cond: str, a: str, b: str) -> str:
        return f"tl.where({cond}, {a}, {b})"

    def _lattice(self, kind: str, e) -> str:
        # Variables first, constants last: tl.maximum(x0, 0.0) reads like torch.clamp(x0, min=0)
        args = sorted(e.args, key=lambda a: a.is_number)
        out = self._print(args[-1])
        for a in reversed(args[:-1]):
            out = self._pair(self._LATTICE[kind], self._print(a), out)
        return out

    def _print_Max(self, e):
        return self._lattice("max", e)

    def _print_Min(self, e):
        return self._lattice("min", e)

    def _print_Piecewise(self, e):
        if e.args[-1].cond is not sympy.true:
            self._unsupported(e, "a Piecewise needs a final (value, True) branch")
        out = self._print(e.args[-1].expr)
        for pair in reversed(e.args[:-1]):
            out = self._select(self._print(pair.cond), self._print(pair.expr), out)
        return out

    def _print_BooleanTrue(self, e):
        self._unsupported(e, "a constant condition outside a Piecewise's last branch")

    _print_BooleanFalse = _print_BooleanTrue

    def _print_Symbol(self, e):
        return e.name

    def _print_Function(self, e):
        self._unsupported(e)

    def emptyPrinter(self, e):
        self._unsupported(e)

    _print_Basic = emptyPrinter


def _cse_symbols():
    i = 0
    while True:
        yield sympy.Symbol(f"t{i}", real=True)
        i += 1


def triton_source(expr: sympy.Expr, n_inputs: int, name: str = "activation") -> str:
    """A Python module whose `@triton.jit def <name>(x0, …, x{n_inputs-1})` returns `expr` in fp32."""
    return _module_source(expr, (expr,), n_inputs, name, "the activation expression")


def triton_grad_source(expr: sympy.Expr, n_inputs: int, name: str = "activation_grad") -> str:
    """A Python module whose `@triton.jit def <name>(x0, …)` returns (expr, ∂expr/∂x0, …, ∂expr/∂x{n-1}) in
    fp32, from `moefuse.expr.gradient`. The value and the derivatives share their common subexpressions
    (sigmoid(x0) of SwiGLU is computed once): the backward epilogue needs all of them at the same point."""
    return _module_source(expr, (expr, *E.gradient(expr, n_inputs)), n_inputs, name,
                          "the activation expression and its partial derivatives (value, d/dx0, ...)")


def _printed(expr: sympy.Expr, outputs: tuple[sympy.Expr, ...], n_inputs: int, name: str, printer_cls, backend: str):
    """(canonical text, printer holding the body's bindings and helpers, printed outputs) of one function of
    x0 … x{n_inputs-1} returning `outputs`, each a function of the activation `expr`, common subexpressions
    bound once."""
    try:
        text = E.to_str(expr)
    except E.ParseError as e:
        raise E.UnsupportedExpression(str(expr), e.reason, backend) from None
    if n_inputs < 1:
        raise ValueError(f"an activation has at least one input, got n_inputs={n_inputs}")
    params = [str(v) for v in E.variables(n_inputs)]
    extra = sorted(str(s) for s in expr.free_symbols if str(s) not in params)
    if extra:
        raise E.ExprError(f"activation {text} reads {extra} but the function has only {n_inputs} input(s)")
    if not name.isidentifier() or name in printer_cls.HELPERS or name in params:
        raise ValueError(f"function name {name!r} must be an identifier other than {params} and the helpers")

    temps = _cse_symbols()
    bindings, bodies = sympy.cse(list(outputs), symbols=temps, order="canonical")
    printer = printer_cls(text, temps)
    for tmp, value in bindings:
        printer.assign(str(tmp), value)
    results = [printer.result(body) for body in bodies]
    return text, printer, results


def _module_source(expr: sympy.Expr, outputs: tuple[sympy.Expr, ...], n_inputs: int, name: str, what: str) -> str:
    """The module of one @triton.jit function of x0 … x{n_inputs-1} returning `outputs` (one value, or a tuple),
    each a function of the activation `expr`."""
    text, printer, results = _printed(expr, outputs, n_inputs, name, _TritonPrinter, "triton")
    params = [str(v) for v in E.variables(n_inputs)]
    lines = [*printer.lines, f"    return {', '.join(results)}"]

    helpers, seen = [], set()

    def need(h):  # dependency order: a helper comes after the helpers it calls
        if h not in seen:
            seen.add(h)
            for dep in HELPERS[h][1]:
                need(dep)
            helpers.append(HELPERS[h][0])
    for h in sorted(printer.helpers):
        need(h)

    return "\n".join([
        f"# Generated by moefuse.kernels.codegen from {what}",
        f"#   {text}",
        "# Arguments and result" + ("s are" if len(outputs) > 1 else " are") + " fp32 tensors of one shape; "
        "everything is computed in fp32.",
        "import triton",
        "import triton.language as tl",
        "",
        *("\n" + h for h in helpers),
        "",
        "@triton.jit",
        f"def {name}({', '.join(params)}):",
        *lines,
        "",
    ])


# ---------------------------------------------------------------------------------------------------------
# C, for the CPU kernels (moefuse/kernels/cpu_moe.cpp)
# ---------------------------------------------------------------------------------------------------------


class _CPrinter(_TritonPrinter):
    """sympy -> C expression text over `float`s, for the CPU kernels' epilogues. The structure (constant
    folding, products for integer powers, NaN-propagating Max/Min) is the Triton printer's; the spellings are
    the helpers defined in cpu_moe.cpp (`mf_exp`, `mf_tanh`, …), which are vectorizable scalar code."""

    HELPERS = frozenset({"mf_exp", "mf_expm1", "mf_sigmoid", "mf_tanh", "mf_max", "mf_min", "mf_sign",
                         "mf_heaviside", "mf_log", "mf_log1p", "mf_erf", "mf_pow"})
    _NAMES = {"tl.sigmoid": "mf_sigmoid", "tl.exp": "mf_exp", "tl.log": "mf_log", "tl.erf": "mf_erf",
              "tl.abs": "std::fabs", "_tanh": "mf_tanh", "_log1p": "mf_log1p", "_expm1": "mf_expm1",
              "_sign": "mf_sign", "_heaviside": "mf_heaviside"}

    def assign(self, name: str, e) -> None:
        rhs = self._print(e)
        self.lines.append(f"  const float {name} = {rhs};")

    def result(self, body) -> str:
        return self._print(body)

    def _unsupported(self, e, hint: str = ""):
        raise E.UnsupportedExpression(self.expr_text, e, "c", hint)

    def _literal(self, e) -> str:
        value = repr(float(super()._literal(e)))
        return f"{value}f" if any(c in value for c in ".e") else f"{value}.0f"

    def _call(self, name: str, *args) -> str:
        return f"{self._NAMES.get(name, name)}({', '.join(self._print(a) for a in args)})"

    _LATTICE = {"max": "mf_max", "min": "mf_min"}

    def _pair(self, fn: str, a: str, b: str) -> str:
        return f"{fn}({a}, {b})"

    def _select(self, cond: str, a: str, b: str) -> str:
        return f"(({cond}) ? ({a}) : ({b}))"

    def _print_And(self, e):
        return " && ".join(f"({self._print(a)})" for a in e.args)

    def _print_Or(self, e):
        return " || ".join(f"({self._print(a)})" for a in e.args)

    def _print_Not(self, e):
        return f"!({self._print(e.args[0])})"

    def _print_Pow(self, expr, rational=False):
        text = super()._print_Pow(expr, rational)
        if "tl.exp2(" in text:  # a real exponent or a constant base: powf, NaN for a negative base as in torch
            base, exp = expr.base, expr.exp
            return f"mf_pow({self._print(base)}, {self._print(exp)})"
        return text.replace("tl.sqrt_rn(", "std::sqrt(").replace("1.0/", "1.0f/")


def c_source(expr_str: str, n_inputs: int) -> str:
    """C functions of the activation `expr_str` for the CPU kernels, every input and result a float:

        static inline float mf_act(float x0, float x1)                  the activation
        static inline void mf_act_grad(float x0, float x1, float* d0, float* d1)
                                                                        its partial derivatives

    Both take two inputs; with one (n_inputs = 1) x1 is ignored and *d1 set to 0."""
    expr = E.parse(expr_str)
    params = "float x0, float x1"
    text, act, (value,) = _printed(expr, (expr,), n_inputs, "mf_act", _CPrinter, "c")
    grads = E.gradient(expr, n_inputs)
    _, grad, results = _printed(expr, tuple(grads), n_inputs, "mf_act_grad", _CPrinter, "c")
    if n_inputs == 1:
        results = [*results, "0.0f"]
    return "\n".join([
        f"// The activation {text} and its partial derivatives, printed by moefuse.kernels.codegen.",
        f"static inline float mf_act({params}) {{",
        "  (void)x0; (void)x1;",
        *act.lines,
        f"  return {value};",
        "}",
        f"static inline void mf_act_grad({params}, float* d0, float* d1) {{",
        "  (void)x0; (void)x1;",
        *grad.lines,
        f"  *d0 = {results[0]};",
        f"  *d1 = {results[1]};",
        "}",
    ])


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated kernel sources live: $MOEFUSE_CACHE_DIR/kernels, default ~/.cache/moefuse/kernels.
    Read at each call, so tests and users can redirect it without re-importing."""
    root = os.environ.get("MOEFUSE_CACHE_DIR") or Path.home() / ".cache" / "moefuse"
    return Path(root) / "kernels"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and os.replace, so a concurrent reader (another process
    compiling the same activation) sees the old file or the whole new one, never a prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def load_activation(expr_str: str, n_inputs: int):
    """The `@triton.jit` function computing `expr_str` (a moefuse.expr string) of `n_inputs` fp32 tensors.
    Memoised per (expr_str, n_inputs); the file is named by a hash of its source, so it is shared by every
    process and spelling that generates the same code."""
    return _import_generated(triton_source(E.parse(expr_str), n_inputs), "activation")


@functools.lru_cache(maxsize=None)
def load_activation_grad(expr_str: str, n_inputs: int):
    """The `@triton.jit` function `(x0[, x1]) -> (a, d0[, d1])`: the activation `expr_str` and its partial
    derivatives ∂a/∂x_j, all fp32, for the backward's epilogue. Cached like `load_activation`."""
    return _import_generated(triton_grad_source(E.parse(expr_str), n_inputs), "activation_grad")


def _import_generated(source: str, name: str):
    """Write `source` (a module defining the jit function `name`) to `cache_dir()/<name>_<hash>.py` unless it is
    there already, import it, and return the function."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:32]
    module_name = f"_moefuse_{name}_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        path = cache_dir() / f"{name}_{digest}.py"
        if not (path.is_file() and path.read_text() == source):
            write_atomic(path, source)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: inspect (hence Triton) finds the source through it
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return getattr(module, name)
