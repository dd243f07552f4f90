"""canonicalize: fold spellings that mean the same value into one, so detection matches one form per concept.

Rules (each keeps every value bit-identical):
  - a dtype cast to the dtype the value already has (`x.to(torch.float32)` on an fp32 x, `.float()` on fp32)
    is the value itself. transformers writes such casts around every expert matmul; in fp32 they are no-ops
    and would otherwise hide the matmul's operands from the matchers.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu

_SAME_DTYPE_CASTS = {"method:float": torch.float32, "method:half": torch.float16, "method:bfloat16": torch.bfloat16}


def _cast_target(node: fx.Node):
    """The dtype a pure cast node produces, or None when the node is not a pure dtype cast."""
    name = fu.op_name(node)
    if name in _SAME_DTYPE_CASTS and len(node.args) == 1 and not node.kwargs:
        return _SAME_DTYPE_CASTS[name]
    if name == "method:to" and not node.kwargs.get("copy", False) and set(node.kwargs) <= {"dtype"}:
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if len(rest) == 1 and isinstance(rest[0], torch.dtype):
            return rest[0]
    return None


def drop_identity_casts(gm: fx.GraphModule) -> int:
    n_dropped = 0
    for node in list(gm.graph.nodes):
        dtype = _cast_target(node)
        src = node.args[0] if node.args else None
        if dtype is None or not isinstance(src, fx.Node):
            continue
        src_val, val = fu.tensor(src), fu.tensor(node)
        if src_val is None or val is None or src_val.dtype != dtype:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        n_dropped += 1
    return n_dropped


def canonicalize(gm: fx.GraphModule) -> None:
    drop_identity_casts(gm)
    gm.graph.lint()
