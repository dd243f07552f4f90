"""Lift the elementwise FX subgraph between the up-projection slices and the activation output into an
expression of `moefuse.expr`.

Works on dynamo's torch-level graph: `call_function` nodes whose targets are torch / torch.nn.functional /
operator callables, and `call_method` nodes on tensors. Activation modules are already inlined by dynamo, so
only functions are handled. One registry (`_RULES`) maps every spelling of an op to a translation that has
torch's own signature, so `inspect.Signature.bind` applies torch's positional/keyword rules and defaults;
nothing is matched by a chain of ifs and an unknown op is a typed rejection, never a guess.

Semantics the lifting relies on (all checked or documented at the rule):
  - Operands (the tensors an op computes on) are lifted recursively; every other argument must be a Python
    number (clamp bounds, slopes, softplus beta, pow exponents). A tensor there — a parameter, a tensor from
    outside, a SymFloat — is `Reason.NON_CONSTANT_ARGUMENT`.
  - Float dtype casts (`.to(dtype)`, `.float()`, `.half()`, `.type_as(t)`, …) are the identity: the kernel
    evaluates the whole expression in fp32 and rounds once when it stores A, so an eager model that rounds an
    intermediate to bf16 gets the more accurate answer. Casts to a non-float dtype change values and are
    refused.
  - In-place ops (`x.mul_(2)`, `F.relu(x, inplace=True)`) are read as their out-of-place form only when the
    mutated tensor has no other user in the graph: later readers of the mutated node would otherwise see a
    value the expression does not describe. The caller must make sure the inputs are not aliased elsewhere.
  - A comparison result used as a number (`x * (x > 0)`) is 1 or 0, like torch's bool -> float promotion.
"""
from __future__ import annotations

import enum
import inspect
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sympy
import torch
import torch.fx
import torch.nn.functional as F

from moefuse import expr as E

__all__ = ["Reason", "UnsupportedActivation", "lift_activation", "supported_ops"]


class Reason(enum.Enum):
    UNKNOWN_OP = "op is not a supported elementwise activation op"
    NON_CONSTANT_ARGUMENT = "a parameter of the op is a tensor or symbolic value, not a Python number"
    BAD_ARGUMENT = "an argument has a value the expression language cannot represent"
    FOREIGN_INPUT = "the activation reads a value that is neither an activation input nor computed from one"
    ALIASED_IN_PLACE = "in-place op on a tensor that other nodes also read"
    NON_FLOAT = "the op produces a non-floating-point tensor"


_HINTS = {
    Reason.UNKNOWN_OP: "write the activation with the ops moefuse.passes.activation.supported_ops() lists "
                       "(torch/F functions, Tensor methods and operators), or add a rule for the op to "
                       "moefuse/passes/activation.py",
    Reason.NON_CONSTANT_ARGUMENT: "pass the value as a Python number (constants are baked into the kernel)",
    Reason.BAD_ARGUMENT: "use the op with the argument values torch documents for float tensors",
    Reason.FOREIGN_INPUT: "the activation may only combine the up-projection slices it was given and "
                          "constants; a learned parameter in the activation is not supported",
    Reason.ALIASED_IN_PLACE: "use the out-of-place form of the op",
    Reason.NON_FLOAT: "keep the activation in floating point",
}


class UnsupportedActivation(Exception):
    """The node cannot be part of an activation expression. `node`, `reason` and `detail` are kept for the
    compile report."""

    def __init__(self, node: torch.fx.Node, reason: Reason, detail: str = ""):
        self.node, self.reason, self.detail = node, reason, detail
        super().__init__(
            f"cannot lift `{node.format_node()}` ({_op_name(node)}) into an activation expression: "
            f"{reason.value}{': ' + detail if detail else ''}. Hint: {_HINTS[reason]}"
        )


class _Reject(Exception):
    """Raised by a translation; becomes UnsupportedActivation once the walker knows the node."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        t = node.target
        module = getattr(t, "__module__", None)
        module = {"_operator": "operator", None: "torch.Tensor"}.get(module, module)  # method descriptors: None
        return f"{module}.{getattr(t, '__name__', t)}"
    return node.op


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    translate: Callable[..., sympy.Expr]
    signature: inspect.Signature
    operands: frozenset[str]  # lifted from the graph (or a number); all other parameters must be constants
    opaque: frozenset[str]  # not part of the value (cast targets): passed through untouched
    conditions: frozenset[str]  # operands that are booleans (torch.where's condition)


_RULES: dict[object, _Rule] = {}  # call_function target (a callable) or call_method name (a str) -> rule
_IN_PLACE: set[object] = set()  # the targets above that mutate their first argument


def _spellings(name: str, *, namespaces: Iterable = (torch, F, torch._C._nn, torch.special),
               method: bool = True, in_place: bool = True) -> list:
    """Every spelling of `name` that exists: torch.<name>, F.<name>, torch._C._nn.<name> (what dynamo records
    for builtins), torch.special.<name>, the Tensor method, and their trailing-underscore in-place forms."""
    found = []
    for suffix in ("", "_") if in_place else ("",):
        for ns in namespaces:
            if callable(getattr(ns, name + suffix, None)):
                found.append((getattr(ns, name + suffix), suffix))
        if method and callable(getattr(torch.Tensor, name + suffix, None)):
            found += [(name + suffix, suffix), (getattr(torch.Tensor, name + suffix), suffix)]
    return found


def _rule(*names: str, extra: Iterable = (), extra_in_place: Iterable = (), operands=("input",), opaque=(),
          conditions=(), **spelling_kw):
    """Register `fn` under every spelling of `names` plus the `extra` targets (operator.* functions) and the
    in-place `extra_in_place` ones (operator.iadd, …, which dynamo records for `y += …`)."""
    def register(fn):
        rule = _Rule(fn, inspect.signature(fn), frozenset(operands), frozenset(opaque), frozenset(conditions))
        targets = [(t, "") for t in extra] + [(t, "_") for t in extra_in_place]
        targets += [s for n in names for s in _spellings(n, **spelling_kw)]
        for target, suffix in targets:
            if _RULES.setdefault(target, rule) is not rule:
                raise AssertionError(f"two activation rules for {target!r}")
            if suffix:
                _IN_PLACE.add(target)
        return fn
    return register


def _number(value, what: str) -> sympy.Expr:
    try:
        return E.const(value)
    except E.ExprError as e:
        raise _Reject(Reason.BAD_ARGUMENT, f"{what}: {e}") from None


# Arithmetic ------------------------------------------------------------------------------------------------

@_rule("add", extra=[operator.add], extra_in_place=[operator.iadd], operands=("input", "other"))
def _add(input, other, alpha=1):
    return input + _number(alpha, "alpha") * other


@_rule("sub", "subtract", extra=[operator.sub], extra_in_place=[operator.isub], operands=("input", "other"))
def _sub(input, other, alpha=1):
    return input - _number(alpha, "alpha") * other


@_rule("rsub", operands=("input", "other"), in_place=False)
def _rsub(input, other, alpha=1):
    return other - _number(alpha, "alpha") * input


@_rule("mul", "multiply", extra=[operator.mul], extra_in_place=[operator.imul], operands=("input", "other"))
def _mul(input, other):
    return input * other


@_rule("div", "divide", "true_divide", extra=[operator.truediv], extra_in_place=[operator.itruediv],
       operands=("input", "other"))
def _div(input, other, rounding_mode=None):
    if rounding_mode is not None:
        raise _Reject(Reason.BAD_ARGUMENT, f"rounding_mode={rounding_mode!r} rounds to integers; only true division "
                                           "has a derivative")
    return input / other


@_rule("neg", "negative", extra=[operator.neg])
def _neg(input):
    return -input


@_rule(extra=[operator.pos])
def _pos(input):
    return input


@_rule("pow", extra=[operator.pow], extra_in_place=[operator.ipow], operands=("input", "exponent"))
def _pow(input, exponent):
    if exponent.free_symbols and not (input.is_number and input.is_positive):
        # x**y of two tensors is NaN for a negative base in torch but exp(y·log x) is not a formula we can
        # print exactly, and its derivative needs log x; no activation needs it
        raise _Reject(Reason.NON_CONSTANT_ARGUMENT, "the exponent must be a number (or the base a positive number)")
    return input**exponent


@_rule("square")
def _square(input):
    return input**2


@_rule("reciprocal")
def _reciprocal(input):
    return 1 / input


@_rule("sqrt")
def _sqrt(input):
    return sympy.sqrt(input)


@_rule("rsqrt")
def _rsqrt(input):
    return 1 / sympy.sqrt(input)


@_rule("abs", "absolute", extra=[operator.abs])
def _abs(input):
    return sympy.Abs(input)


@_rule("maximum", operands=("input", "other"))
def _maximum(input, other):
    return sympy.Max(input, other)


@_rule("minimum", operands=("input", "other"))
def _minimum(input, other):
    return sympy.Min(input, other)


# Comparisons and where -------------------------------------------------------------------------------------

def _comparison(relation):
    def translate(input, other):
        return relation(input, other)
    return translate


for _names, _op, _relation in (
    (("gt", "greater"), operator.gt, sympy.Gt), (("lt", "less"), operator.lt, sympy.Lt),
    (("ge", "greater_equal"), operator.ge, sympy.Ge), (("le", "less_equal"), operator.le, sympy.Le),
    (("eq",), operator.eq, sympy.Eq), (("ne", "not_equal"), operator.ne, sympy.Ne),
):
    _rule(*_names, extra=[_op], operands=("input", "other"), in_place=False)(_comparison(_relation))


@_rule("where", operands=("condition", "input", "other"), conditions=("condition",), in_place=False, method=False)
def _where(condition, input, other):
    return sympy.Piecewise((input, condition), (other, True))


# Transcendental functions ----------------------------------------------------------------------------------

def _unary(fn):
    def translate(input):
        return fn(input)
    return translate


for _name, _fn in (("exp", sympy.exp), ("log", sympy.log), ("log1p", E.log1p), ("expm1", E.expm1),
                   ("sigmoid", E.sigmoid), ("expit", E.sigmoid), ("tanh", sympy.tanh), ("erf", sympy.erf)):
    _rule(_name)(_unary(_fn))


# Activations (formulas with torch's semantics live in moefuse.expr) -------------------------------------

@_rule("relu")
def _relu(input, inplace=False):
    return E.relu(input)


@_rule("relu6")
def _relu6(input, inplace=False):
    return E.relu6(input)


@_rule("silu")
def _silu(input, inplace=False):
    return E.silu(input)


@_rule("mish")
def _mish(input, inplace=False):
    return E.mish(input)


@_rule("gelu")
def _gelu(input, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise _Reject(Reason.BAD_ARGUMENT, f"approximate={approximate!r}; torch accepts 'none' or 'tanh'")
    return E.gelu(input, approximate)


@_rule("softplus")
def _softplus(input, beta=1, threshold=20):
    return E.softplus(input, _number(beta, "beta"), _number(threshold, "threshold"))


@_rule("leaky_relu")
def _leaky_relu(input, negative_slope=0.01, inplace=False):
    return E.leaky_relu(input, _number(negative_slope, "negative_slope"))


@_rule("elu")
def _elu(input, alpha=1.0, inplace=False):
    return E.elu(input, _number(alpha, "alpha"))


@_rule("celu")
def _celu(input, alpha=1.0, inplace=False):
    return E.celu(input, _number(alpha, "alpha"))


@_rule("selu")
def _selu(input, inplace=False):
    return E.selu(input)


@_rule("hardtanh")
def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return E.hardtanh(input, _number(min_val, "min_val"), _number(max_val, "max_val"))


@_rule("hardsigmoid")
def _hardsigmoid(input, inplace=False):
    return E.hardsigmoid(input)


@_rule("hardswish")
def _hardswish(input, inplace=False):
    return E.hardswish(input)


@_rule("logsigmoid", "log_sigmoid")
def _logsigmoid(input):
    return E.logsigmoid(input)


@_rule("softsign")
def _softsign(input):
    return E.softsign(input)


@_rule("tanhshrink")
def _tanhshrink(input):
    return E.tanhshrink(input)


@_rule("threshold")
def _threshold(input, threshold, value, inplace=False):
    return E.threshold(input, _number(threshold, "threshold"), _number(value, "value"))


@_rule("clamp", "clip")
def _clamp(input, min=None, max=None):  # noqa: A002 - torch's parameter names
    if min is None and max is None:
        raise _Reject(Reason.BAD_ARGUMENT, "clamp without min or max")
    return E.clamp(input, None if min is None else _number(min, "min"), None if max is None else _number(max, "max"))


@_rule("clamp_min")
def _clamp_min(input, min):  # noqa: A002
    return E.clamp(input, min=_number(min, "min"))


@_rule("clamp_max")
def _clamp_max(input, max):  # noqa: A002
    return E.clamp(input, max=_number(max, "max"))


# Casts and layout: the identity on values (see module docstring) -------------------------------------------

def _check_float_dtype(values) -> None:
    for v in values:
        if isinstance(v, torch.dtype) and not v.is_floating_point:
            raise _Reject(Reason.NON_FLOAT, f"cast to {v}")


@_rule("to", namespaces=(), opaque=("args", "kwargs"), in_place=False)
def _to(input, *args, **kwargs):
    _check_float_dtype([*args, *kwargs.values()])
    return input


@_rule("type_as", namespaces=(), opaque=("other",), in_place=False)
def _type_as(input, other):
    return input  # a non-float `other` is caught by the result-dtype check in the walker


@_rule("float", "half", "bfloat16", "double", "contiguous", "clone", namespaces=(torch,),
       opaque=("memory_format",), in_place=False)
def _identity(input, memory_format=None):
    return input


# Refused with a specific reason rather than "unknown op": spellings people do write in activations.
_REFUSED = {
    operator.floordiv: "floor division (//) rounds to an integer-valued, piecewise-constant result",
    operator.mod: "modulo is not an activation",
    torch.floor_divide: "floor division rounds to an integer-valued, piecewise-constant result",
    "floor_divide": "floor division rounds to an integer-valued, piecewise-constant result",
    "detach": "detach would change the gradient the backward kernel derives from the expression",
}


def supported_ops() -> list[str]:
    """Names of the ops the lifter understands (each in all its spellings: torch.*, F.*, Tensor methods,
    operators, in-place forms), for messages and documentation."""
    names = {t if isinstance(t, str) else t.__name__ for t in _RULES}
    return sorted({n.removeprefix("special_").lstrip("_").removesuffix("_") for n in names})


# ---------------------------------------------------------------------------------------------------------
# The walker
# ---------------------------------------------------------------------------------------------------------


def lift_activation(output_node: torch.fx.Node, inputs: dict[torch.fx.Node, sympy.Symbol]) -> sympy.Expr:
    """The expression `output_node` computes from `inputs` (nodes -> the variables x0, x1, … they stand for).

    Raises UnsupportedActivation (with the offending node and a typed Reason) if any node between them is not
    a supported elementwise op, or reads anything but the inputs and Python numbers.
    """
    memo: dict[torch.fx.Node, sympy.Basic] = dict(inputs)
    result = _lift(output_node, memo)
    if _is_condition(result):
        raise UnsupportedActivation(output_node, Reason.NON_FLOAT, "the activation's result is a comparison")
    return result


def _lift(node: torch.fx.Node, memo: dict) -> sympy.Basic:
    # Recursion depth is the activation's depth (a handful of ops): the walk stops at the inputs and at the
    # first node that is not an elementwise op.
    if node in memo:
        return memo[node]
    target = node.target
    if node.op not in ("call_function", "call_method"):
        raise UnsupportedActivation(node, Reason.FOREIGN_INPUT, f"a {node.op} node")
    if target in _REFUSED:
        raise UnsupportedActivation(node, Reason.UNKNOWN_OP, _REFUSED[target])
    rule = _RULES.get(target)
    if rule is None:
        raise UnsupportedActivation(node, Reason.UNKNOWN_OP)
    try:
        bound = rule.signature.bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise UnsupportedActivation(node, Reason.BAD_ARGUMENT,
                                    f"arguments do not match {rule.signature}: {e}") from None
    if target in _IN_PLACE or bound.arguments.get("inplace") is True:
        mutated = bound.arguments.get("input")
        if isinstance(mutated, torch.fx.Node) and len(mutated.users) > 1:
            raise UnsupportedActivation(node, Reason.ALIASED_IN_PLACE, f"{mutated.name} is also read by "
                                        f"{', '.join(u.name for u in mutated.users if u is not node)}")
    try:
        for name, value in bound.arguments.items():
            if name in rule.opaque:
                continue
            if name in rule.operands:
                bound.arguments[name] = _operand(value, name, memo, boolean=name in rule.conditions)
                continue
            graph_values: list[torch.fx.Node] = []
            torch.fx.node.map_arg(value, lambda n: graph_values.append(n) or n)
            if graph_values:
                raise _Reject(Reason.NON_CONSTANT_ARGUMENT,
                              f"`{name}` is computed in the graph ({', '.join(n.name for n in graph_values)})")
        result = rule.translate(*bound.args, **bound.kwargs)
    except _Reject as r:
        raise UnsupportedActivation(node, r.reason, r.detail) from None
    except E.ExprError as e:
        raise UnsupportedActivation(node, Reason.BAD_ARGUMENT, str(e)) from None
    example = node.meta.get("example_value")
    if (isinstance(example, torch.Tensor) and not example.dtype.is_floating_point
            and not _is_condition(result)):
        raise UnsupportedActivation(node, Reason.NON_FLOAT, f"result dtype {example.dtype}")
    memo[node] = result
    return result


def _is_condition(value) -> bool:
    # sympy's Symbol is also a Boolean (it can stand in logic formulas), so test for "not a number" too
    return isinstance(value, sympy.logic.boolalg.Boolean) and not isinstance(value, sympy.Expr)


def _operand(value, name: str, memo: dict, *, boolean: bool) -> sympy.Basic:
    """An operand as a sympy value (a lifted node or a constant): a condition where `boolean`, else a number."""
    if isinstance(value, torch.fx.Node):
        value = _lift(value, memo)
    elif isinstance(value, bool):
        value = sympy.true if value else sympy.false
    elif isinstance(value, (int, float)):
        value = _number(value, f"`{name}`")
    else:
        raise _Reject(Reason.BAD_ARGUMENT, f"`{name}` is {value!r} ({type(value).__name__})")
    is_condition = _is_condition(value)
    if boolean and not is_condition:
        raise _Reject(Reason.BAD_ARGUMENT, f"`{name}` must be a comparison, got {value}")
    if not boolean and is_condition:
        value = sympy.Piecewise((1, value), (0, True))  # torch promotes True/False to 1/0
    return value
