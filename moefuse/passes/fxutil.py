"""Small helpers over dynamo's torch-level FX graphs: op names, concrete shapes, peeling layout ops."""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx


def op_name(node: fx.Node) -> str:
    """A stable name for what a node does: 'method:view', 'torch.sort', 'transformers::grouped_mm_fallback'."""
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return t._qualified_op_name if isinstance(t, torch._ops.OpOverloadPacket) else t.name()
    if t is operator.getitem:
        return "getitem"
    if t is operator.setitem:
        return "setitem"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch._C._nn") or mod == "torch.nn.functional":
        return f"F.{name}"
    if mod == "_operator" or mod == "operator":
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return f"{mod}.{name}"


def value(node) -> object:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def tensor(node) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def hint(s) -> int | None:
    """A concrete int for a possibly symbolic size (its hint: the value seen while tracing); None for an
    unbacked size with no hint (the row count of a `nonzero`, captured with capture_dynamic_output_shape_ops)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        h = s.node.hint
        if h is None:
            try:
                h = s.node.shape_env.size_hint(s.node.expr)
            except Exception:  # noqa: BLE001 — GuardOnDataDependentSymNode: no value to give
                return None
        return int(h)
    return int(s)


def nodes_of(value) -> list:
    """A weight operand as a list of nodes: one stacked parameter, or one 2-D parameter per expert."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def shape(node) -> tuple[int, ...] | None:
    t = tensor(node)
    return None if t is None else tuple(hint(s) for s in t.shape)


def numel(node) -> int | None:
    s = shape(node)
    if s is None or None in s:
        return None
    n = 1
    for d in s:
        n *= d
    return n


def is_float(node) -> bool:
    t = tensor(node)
    return t is not None and t.dtype.is_floating_point


def is_int(node) -> bool:
    t = tensor(node)
    return t is not None and not t.dtype.is_floating_point and t.dtype != torch.bool


_CASTS = {"method:to", "method:float", "method:half", "method:bfloat16", "method:type_as", "method:contiguous"}
_VIEWS = {"method:view", "method:reshape", "method:flatten", "torch.reshape", "torch.flatten", "method:unsqueeze",
          "method:squeeze", "torch.unsqueeze", "method:expand"}


# Factories that read only the shape/dtype/device of their input: an external input of one is not a value a
# region computes with, and their output carries no data of it.
SHAPE_ONLY = {"torch.zeros_like", "torch.empty_like", "torch.ones_like", "torch.full_like", "method:new_zeros",
              "method:new_empty", "method:new_ones", "method:new_full"}


def is_cast(node: fx.Node) -> bool:
    return op_name(node) in _CASTS


def is_view(node: fx.Node) -> bool:
    return op_name(node) in _VIEWS


def peel(node, ops: Iterable[str]) -> fx.Node:
    """Follow the first argument up through nodes whose op is in `ops`."""
    ops = set(ops)
    while isinstance(node, fx.Node) and op_name(node) in ops and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def peel_casts(node) -> fx.Node:
    return peel(node, _CASTS)


def peel_layout(node) -> fx.Node:
    return peel(node, _CASTS | _VIEWS)


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """All nodes the given ones depend on (exclusive of the given ones unless reached again)."""
    seen: set[fx.Node] = set()
    stack = [i for n in nodes for i in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every value computed from `nodes`, including through in-place updates (`mask.scatter_(1, ids, 1)` makes
    every later reader of `mask` depend on ids)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        for u in n.users:
            for v in (u, u.args[0]) if is_mutation(u) and isinstance(u.args[0], fx.Node) else (u,):
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
    return seen


def is_mutation(node: fx.Node) -> bool:
    """In-place ops as dynamo records them: `a[i] = b` (setitem) and `a.add_(b)`-style method calls."""
    name = op_name(node)
    return name == "setitem" or (name.startswith("method:") and name.endswith("_") and not name.endswith("__"))


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def module_stack(node: fx.Node) -> list[str]:
    return [_clean_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _clean_path(path: str) -> str:
    # dynamo spells module paths as "L['self'].model.layers[0].mlp"; show the user's "model.layers.0.mlp".
    for prefix in ("L['self'].", "L['self']", "L['fn']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("[", ".").replace("]", "").replace("'", "") or "<top>"
