"""Expert contractions, whatever their spelling: find every use of a 3-D expert weight [E, a, b] in a product
and say which of its dims the product contracts.

MoE code spells "multiply each row by its expert's weight" many ways: `torch._grouped_mm(x_sorted, w.T, offs)`,
`einsum('ti,taoi->tao', x, w[ids])`, `einsum('th,enh->ten', x, w)`, `bmm(w[ids], v.unsqueeze(-1))`,
`x_e @ w`, with the weight cast, transposed or permuted first. Rather than one matcher per spelling, each
use is followed from the parameter to the product while tracking where the parameter's dims go (casts,
transposes, permutes, `W[idx]` gathers, unsqueezes, views that keep the last two dims); at the product the
contracted index is read by its role — the einsum letter shared with the other operand and absent from the
output, the second-to-last dim of a right matmul operand, the last of a left one. The result is the
weight's orientation (out × in or in × out), independent of how the code spelled it.

What a contraction does with the rows (per expert groups, per-pair gathered weights, every expert on every
token, capacity slots) is not decided here: `generic` builds the region from the roles and the compiler's
verification checks the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu

GROUPED_MM = {"transformers::grouped_mm_fallback", "aten::_grouped_mm", "torch._grouped_mm", "F.grouped_mm",
              "torch.grouped_mm"}
_MATMUL = {"torch.bmm", "torch.matmul", "operator.matmul", "method:bmm", "method:matmul"}
_EINSUM = {"torch.einsum", "torch.functional.einsum"}
_SAME_DIMS = {"method:to", "method:float", "method:half", "method:bfloat16", "method:type_as", "method:contiguous",
              "method:clone", "torch.clone"}
_TRANSPOSE = {"method:transpose", "torch.transpose", "method:swapaxes", "torch.swapaxes", "method:swapdims",
              "torch.swapdims"}
_T = {"method:t", "torch.t"}
_PERMUTE = {"method:permute", "torch.permute"}
_UNSQUEEZE = {"method:unsqueeze", "torch.unsqueeze"}
_RESHAPE = {"method:view", "method:reshape", "torch.reshape", "method:flatten", "torch.flatten", "method:expand"}


@dataclass(frozen=True)
class Contraction:
    """One product of an expert weight with the rows it applies to."""

    node: fx.Node  # the product (einsum, bmm, matmul, grouped mm)
    weight: fx.Node  # the 3-D parameter [E, a, b] as the graph holds it
    operand: fx.Node  # the other operand: the rows (tokens, activations) the weight multiplies
    transposed: bool  # the parameter is [E, in, out] (in = the contracted dim); False: [E, out, in]
    gathered_by: fx.Node | None  # the expert-id tensor of a `W[ids]` gather on the way, if any

    @property
    def num_experts(self) -> int:
        return fu.shape(self.weight)[0]

    @property
    def in_features(self) -> int:
        return fu.shape(self.weight)[1 if self.transposed else 2]

    @property
    def out_features(self) -> int:
        return fu.shape(self.weight)[2 if self.transposed else 1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the product computes in (the weight as the product reads it, after casts)."""
        return fu.tensor(self.node).dtype


def _param(node: fx.Node) -> bool:
    t = fu.tensor(node)
    return node.op in ("placeholder", "get_attr") and t is not None and t.dim() == 3 and t.dtype.is_floating_point


def _step(user: fx.Node, src: fx.Node, dims: list) -> tuple[list, fx.Node | None] | None:
    """Where the dims of `src` (a list: original weight dim or None per dim) go in `user`; None when `user`
    is not a dim-preserving step on the weight's way to a product. Also the index of a `W[idx]` gather."""
    name = fu.op_name(user)
    if not user.args or user.args[0] is not src:
        return None
    nd = len(dims)
    if name in _SAME_DIMS:
        return dims, None
    if name in _TRANSPOSE:
        a, b = (fu.arg(user, 1, "dim0"), fu.arg(user, 2, "dim1"))
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        out = list(dims)
        out[a % nd], out[b % nd] = out[b % nd], out[a % nd]
        return out, None
    if name in _T:
        return dims[::-1], None
    if name in _PERMUTE:
        order = user.args[1:] if len(user.args) > 2 or isinstance(user.args[1], int) else user.args[1]
        order = [d % nd for d in order]
        return [dims[d] for d in order], None
    if name in _UNSQUEEZE:
        d = fu.arg(user, 1, "dim")
        out = list(dims)
        out.insert(d % (nd + 1), None)
        return out, None
    if name == "getitem" and isinstance(user.args[1], fx.Node) and fu.is_int(user.args[1]) and dims[0] == 0:
        idx = user.args[1]  # W[ids]: dim 0 (the experts) replaced by the index's dims
        return [None] * len(fu.shape(idx)) + list(dims[1:]), idx
    if name in ("torch.index_select", "method:index_select") and fu.arg(user, 1, "dim") == 0 and dims[0] == 0:
        return [None] + list(dims[1:]), fu.arg(user, 2, "index")
    if name in _RESHAPE:
        before, after = fu.shape(src), fu.shape(user)
        if before is None or after is None or len(after) < 2 or before[-2:] != after[-2:]:
            return None
        if before == after:
            return dims, None
        return [None] * (len(after) - 2) + list(dims[-2:]), None
    return None


def _contracted(user: fx.Node, src: fx.Node, dims: list) -> tuple[int, fx.Node] | None:
    """(the original weight dim the product `user` contracts, the other operand), or None."""
    name = fu.op_name(user)
    if name in GROUPED_MM:
        a, b = user.args[0], fu.arg(user, 1, "weight") if name == "transformers::grouped_mm_fallback" else user.args[1]
        if b is src and isinstance(a, fx.Node):  # A [S, k] · B [E, k, n]
            return dims[-2], a
        return None
    if name in _MATMUL and len(user.args) == 2:
        a, b = user.args
        if b is src and isinstance(a, fx.Node):
            return dims[-2], a
        if a is src and isinstance(b, fx.Node):
            return dims[-1], b
        return None
    if name in _EINSUM and isinstance(user.args[0], str) and len(user.args) == 3:
        terms_out = _einsum_terms(user.args[0], [fu.shape(a) for a in user.args[1:]])
        if terms_out is None:
            return None
        terms, out = terms_out
        mine = 0 if user.args[1] is src else 1 if user.args[2] is src else None
        if mine is None or len(terms[mine]) != len(dims):
            return None
        other = terms[1 - mine]
        shared = [c for c in terms[mine] if c in other and c not in out]
        if len(shared) != 1:
            return None
        return dims[terms[mine].index(shared[0])], user.args[2 - mine]
    return None


def _einsum_terms(equation: str, shapes: list) -> tuple[list[str], str] | None:
    """The operand and output subscripts of a two-operand einsum with any ellipsis spelled out as letters
    (right-aligned, as einsum broadcasts them); None for implicit outputs and unknown shapes."""
    eq = equation.replace(" ", "")
    if "->" not in eq or any(s is None for s in shapes):
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    spans = [len(s) - len(t.replace("...", "")) if "..." in t else 0 for t, s in zip(terms, shapes)]
    width = max(spans)
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq][:width]
    terms = [t.replace("...", "".join(free[width - n:])) for t, n in zip(terms, spans)]
    out = out.replace("...", "".join(free))
    return terms, out


def expert_contractions(graph: fx.Graph) -> list[Contraction]:
    """Every product of a 3-D float parameter whose experts (dim 0) are kept and one of whose other two dims
    is contracted, in graph order."""
    found = []
    for p in graph.nodes:
        if not _param(p):
            continue
        frontier = [(p, [0, 1, 2], None)]
        for _ in range(8):  # the weight's own path is short: a cast, a transpose, a gather
            nxt = []
            for src, dims, gathered in frontier:
                for user in src.users:
                    hit = _contracted(user, src, dims)
                    if hit is not None and hit[0] in (1, 2) and isinstance(hit[1], fx.Node):
                        found.append(Contraction(user, p, hit[1], hit[0] == 1, gathered))
                        continue
                    step = _step(user, src, dims)
                    if step is not None:
                        nxt.append((user, step[0], step[1] if step[1] is not None else gathered))
            frontier = nxt
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(found, key=lambda c: order[c.node])
