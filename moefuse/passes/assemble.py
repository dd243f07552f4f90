"""assemble: what every front end builds a `Region` from, once it has found a layer's boundary.

A front end (`generic` by the roles of the expert products, `input_weighted` for Llama4's form) establishes a
`Dispatch`: the tokens, the expert ids, the expert weights as the graph holds them, the up output and the down
input. From there the steps are the same for every form:
  1. the activation between the expert products is lifted into an expression over slices of the up output
     (`activation_between`; `moefuse.passes.activation` does the lifting) — any elementwise activation;
  2. the region is every node between the boundary and the output (`_region_nodes`): it must read nothing
     else (per-expert biases and symbolic sizes excepted), nothing computed from the tokens or weights inside
     it may be used outside it, it holds no masking op and no capacity limit;
  3. a shared expert whose output is added to the routed output (a dense Linear → act → Linear of the same
     tokens, optionally × sigmoid(Linear(x))) joins the region when it stays closed and convex with it
     (`_shared_expert`); otherwise it stays beside the op;
  4. the spec: sizes, dtypes, activation, biases, router description, gate/up held apart (`assemble`).
Everything raises `Reject` with a typed reason; the router itself stays in the graph.
"""
from __future__ import annotations

import itertools
import logging
import types
from dataclasses import dataclass

import torch
import torch.fx as fx

from moefuse import expr as _expr
from moefuse.passes import fxutil as fu
from moefuse.passes.activation import UnsupportedActivation, lift_activation
from moefuse.passes.region import Reason, Region, Reject, SharedBranch
from moefuse.spec import Activation, MoESpec, SharedExpert

log = logging.getLogger("moefuse.detect")


# Ops whose presence inside a region means data-dependent masking (capacity limits, EP sentinels) that the
# fused op does not model; a region containing one is rejected rather than guessed at.
_MASKING = {"operator.lt", "operator.le", "operator.gt", "operator.ge", "operator.eq", "operator.ne",
            "torch.where", "method:masked_fill", "method:masked_fill_", "torch.masked_fill", "method:lt",
            "method:gt", "method:ge", "method:le", "method:eq", "method:ne", "torch.lt", "torch.gt", "torch.ge",
            "torch.le", "torch.eq", "torch.ne", "torch.nonzero", "method:nonzero", "torch.topk", "method:topk"}


@dataclass
class Dispatch:
    """What a front end establishes for one (up, down) pair of expert matmuls."""

    form: str
    x: fx.Node  # tokens [T, H]
    topk_ids: fx.Node  # [T, K] int
    w1: fx.Node  # weight operand of the up matmul as the graph holds it
    w2: fx.Node
    w1_transposed: bool  # True when that operand is [E, in, out]
    w2_transposed: bool
    up_out: fx.Node  # up-projection output; its last dim is the up rows N1
    down_in: fx.Node  # the down matmul's activation operand
    down_out: fx.Node | None = None  # the down projection's [S, H] output when it is not the matmul node itself
    input_scores: fx.Node | None = None  # [T, E] scores that scale each expert's *input* (zero off the top-k)
    w3: fx.Node | None = None  # the second up weight when gate and up are held apart (`MoESpec.w3`)
    w3_transposed: bool = False
    dtype: torch.dtype | None = None  # what the expert products compute in, when not w1's dtype (casts inside)
    # The per-expert selections of a loop over experts (`ids == e`, `where`): exact routing, not masking
    selection: frozenset = frozenset()


_PARTS = ("method:chunk", "torch.chunk", "method:split", "torch.split", "torch.functional.split")


def _slice_of(node: fx.Node, up: fx.Node, n1: int):
    """(offset, step, length) when `node` reads a slice of `up`'s last dim; None when it reads `up` whole."""
    name = fu.op_name(node)
    if name == "getitem" and isinstance(node.args[0], fx.Node) and fu.op_name(node.args[0]) in _PARTS:
        parts = node.args[0]  # chunk(n) or split(size | sizes), along the last dim
        dim = fu.arg(parts, 2, "dim", 0)
        if fu.op_name(parts) in ("method:chunk", "torch.chunk"):
            n = fu.arg(parts, 1, "chunks")
            sizes = [n1 // n] * n if isinstance(n, int) and n1 % n == 0 else None
        else:
            size = fu.arg(parts, 1, "split_size_or_sections", fu.arg(parts, 1, "split_size"))
            sizes = [size] * (n1 // size) if isinstance(size, int) and n1 % size == 0 else (
                list(size) if isinstance(size, (list, tuple)) and sum(size) == n1 else None)
        if dim not in (-1, len(fu.shape(up)) - 1) or sizes is None:
            raise Reject(Reason.UNSUPPORTED_ACTIVATION, parts, "the up-projection is not cut along its last dim "
                                                               "into parts moefuse can slice")
        j = node.args[1]
        return sum(sizes[:j]), 1, sizes[j]
    if name == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        last = idx[-1]
        lead_ok = all(i is Ellipsis or i == slice(None) for i in idx[:-1])
        if isinstance(last, slice) and lead_ok and (idx[0] is Ellipsis or len(idx) == len(fu.shape(up))):
            start, stop, step = last.indices(n1)
            return start, step, len(range(start, stop, step))
    raise Reject(Reason.UNSUPPORTED_ACTIVATION, node, f"{name} reads the up-projection in a way moefuse cannot slice")


def _activation(d: Dispatch) -> tuple[Activation, int]:
    return activation_between(_after_bias(d.up_out), d.down_in)


def _after_bias(up: fx.Node) -> fx.Node:
    """`up + b1[ids]` when the up projection's only use is adding a gathered per-expert bias (the bias is the
    spec's b1, found by the region check); else `up`. An in-place `up.add_(…)` needs no skipping."""
    users = [u for u in up.users if not fu.is_mutation(u)]
    if len(users) == 1 and fu.op_name(users[0]) in ("operator.add", "torch.add", "method:add") and len(users[0].args) == 2:
        other = next(a for a in users[0].args if a is not up)
        if isinstance(other, fx.Node) and fu.op_name(other) == "getitem" and other.args[0].op == "placeholder":
            return users[0]
    return up


def activation_between(up: fx.Node, down_in: fx.Node) -> tuple[Activation, int]:
    """The activation from the up-projection output `up` [.., N1] to the down-projection input `down_in`
    [.., I], as an expression over slices of `up`'s last dim; and I. Raises `Reject`."""
    n1 = fu.shape(up)[-1]
    slices: dict[fx.Node, tuple[int, int, int]] = {}
    whole = []
    for user in up.users:
        if fu.is_mutation(user):
            continue  # a bias added in place; the region check accounts for it
        if fu.op_name(user) in _PARTS:
            for g in user.users:
                slices[g] = _slice_of(g, up, n1)
        elif fu.op_name(user) == "getitem":
            slices[user] = _slice_of(user, up, n1)
        else:
            whole.append(user)
    if whole and slices:
        raise Reject(Reason.UNSUPPORTED_ACTIVATION, up, "the up-projection is read both whole and in slices")
    if whole:
        variables = {up: (0, 1, n1)}
    else:
        variables = slices
    lengths = {length for _, _, length in variables.values()}
    if len(variables) > 2 or len(lengths) != 1:
        raise Reject(Reason.UNSUPPORTED_ACTIVATION, up, f"{len(variables)} slices of lengths {sorted(lengths)}")
    ordered = sorted(variables.items(), key=lambda kv: kv[1][0])
    symbols = _expr.variables(len(ordered))
    try:
        e = lift_activation(down_in, {node: sym for (node, _), sym in zip(ordered, symbols)})
    except UnsupportedActivation as exc:
        raise Reject(Reason.UNSUPPORTED_ACTIVATION, getattr(exc, "node", down_in), str(exc)) from exc
    activation = Activation(_expr.to_str(e), tuple((off, step) for _, (off, step, _) in ordered))
    return activation, lengths.pop()


def activation_of_pair(ups: list[fx.Node], down_in: fx.Node, i: int) -> Activation:
    """The activation from two up outputs [.., I] (gate and up held as separate weights: x_j reads up output j,
    the rows [j·I, (j+1)·I) of the virtual [w1; w3]) to the down input. Raises `Reject`."""
    try:
        lifted = lift_activation(down_in, dict(zip(ups, _expr.variables(2))))
    except UnsupportedActivation as exc:
        raise Reject(Reason.UNSUPPORTED_ACTIVATION, exc.node, str(exc)) from exc
    return Activation(_expr.to_str(lifted), ((0, 1), (i, 1)))


_captures = itertools.count()


def capture_activation(fn, up_rows: int) -> Activation:
    """The activation a Python callable applies to an up-projection output [S, up_rows] (e.g. a transformers
    experts module's `_apply_gate`), read from the graph dynamo captures of it. Raises `Reject`."""
    import torch._dynamo

    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def probe_fn(up):
        return fn(up)

    # dynamo caches compiled frames per code object: a fresh code object per capture means a fresh capture
    # (and no recompile limit reached after a few converted modules).
    code = probe_fn.__code__.replace(co_name=f"moefuse_capture_{next(_captures)}")
    probe_fn = types.FunctionType(code, probe_fn.__globals__, code.co_name, None, probe_fn.__closure__)
    torch.compile(probe_fn, backend=capture, fullgraph=True, dynamic=False)(torch.randn(3, up_rows))
    gm = graphs[-1]
    up = next(n for n in gm.graph.nodes if n.op == "placeholder" and fu.shape(n) == (3, up_rows))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    activation, _ = activation_between(up, fu.peel_casts(out))
    return activation


def _close_region(output: fx.Node, boundary: list[fx.Node]) -> list[fx.Node]:
    """Nodes computing `output` from the boundary values, plus in-place updates of those nodes."""
    outside = set(boundary) | fu.ancestors(boundary)
    inside = {n for n in fu.ancestors([output]) | {output} if n not in outside}
    changed = True
    while changed:  # mutations (a[i] = b, a.add_(b)) are not ancestors of anything: pull them in with their inputs
        changed = False
        for n in list(inside):
            for u in n.users:
                if u not in inside and fu.is_mutation(u) and u.args and u.args[0] is n:
                    inside |= {u} | (fu.ancestors([u]) - outside)
                    changed = True
    inside |= _size_checks(inside)
    graph_order = {n: i for i, n in enumerate(output.graph.nodes)}
    # Graph inputs (parameters, buffers, sizes) are never part of a region: they are read, as biases or sizes.
    return sorted((n for n in inside if n.op not in ("placeholder", "get_attr")), key=graph_order.__getitem__)


def _size_checks(inside: set[fx.Node]) -> set[fx.Node]:
    """The runtime checks dynamo hangs on a data-dependent size inside the region (`bincount`'s length, a
    `nonzero`'s count): `sym_size` of a region value, comparisons of it and the `_assert_scalar` they end in.
    They read only sizes of values the region computes, and go with it."""
    found: set[fx.Node] = set()
    sizes = [u for n in inside for u in n.users if u not in inside]
    # parts of a tuple the region makes (`where(mask)[0]`) read only for their size go with it too
    sizes += [v for u in list(sizes) if fu.op_name(u) == "getitem" and not isinstance(fu.value(u.args[0]), torch.Tensor)
              for v in u.users]
    for u in sizes:
        if u in inside or u in found or fu.op_name(u) not in ("aten::sym_size", "aten::sym_size.int"):
            continue
        tail, stack = {u}, [u]
        while stack:
            for v in stack.pop().users:
                if v not in tail:
                    tail.add(v)
                    stack.append(v)
        if all(not isinstance(fu.value(v), torch.Tensor) for v in tail):
            found |= tail
            part = u.args[0]
            if fu.op_name(part) == "getitem" and part not in inside and all(w in found for w in part.users):
                found.add(part)
    return found


def _bias_role(param: fx.Node, up: fx.Node, down: fx.Node) -> str | None:
    """"b1" / "b2" when `param` (per expert, possibly gathered by expert id) is added to the output of the up /
    down matmul, in place or not; None otherwise."""
    frontier = [param]
    for _ in range(4):
        frontier = [u for n in frontier for u in n.users]
        for n in frontier:
            if fu.op_name(n) in ("operator.add", "operator.iadd", "torch.add", "method:add", "method:add_"):
                if up in n.args:
                    return "b1"
                if down in n.args:
                    return "b2"
    return None


def _router_description(ids: fx.Node, weights: fx.Node) -> str:
    steps, cur = [], weights
    for _ in range(12):
        name = fu.op_name(cur)
        if not (fu.is_cast(cur) or fu.is_view(cur) or name == "getitem"):
            steps.append(name.split(".")[-1].split(":")[-1])
        if name in ("F.linear", "torch.matmul", "operator.matmul") or cur.op == "placeholder":
            break
        inputs = [a for a in cur.args if isinstance(a, fx.Node)]
        if not inputs:
            break
        cur = inputs[0]
    return "→".join(reversed(steps)) or "unknown"


# Ops that make router logits from tokens (the router's scores are computed back to here, never further)
LOGITS = {"F.linear", "torch.matmul", "operator.matmul", "torch.mm", "torch.addmm", "torch.einsum", "torch.bmm"}


def _router_scores(ids: fx.Node, t: int, e: int, k: int) -> tuple[fx.Node | None, str]:
    """The [T, E] score matrix the top-k ids were taken over (for token rounding), or None and why not.

    Only a `torch.topk(scores, K, dim=-1)` whose ids reach the region through casts and views counts, and only
    over probability-like scores: raw logits (top-k straight after the router's linear, as in GPT-OSS) would
    give the pairs rounding adds an unnormalised, possibly negative weight."""
    cur = fu.peel_layout(ids)
    if not (fu.op_name(cur) == "getitem" and cur.args[1] == 1 and isinstance(cur.args[0], fx.Node)
            and fu.op_name(cur.args[0]) in ("torch.topk", "method:topk")):
        return None, f"the expert ids come from {fu.op_name(cur)}, not from the indices of a torch.topk"
    topk = cur.args[0]
    scores, kk = fu.arg(topk, 0, "input"), fu.arg(topk, 1, "k")
    dim, largest = fu.arg(topk, 2, "dim", -1), fu.arg(topk, 3, "largest", True)
    if not isinstance(scores, fx.Node) or not fu.is_float(scores) or fu.shape(scores) != (t, e):
        return None, f"top-k was taken over a tensor of shape {fu.shape(scores)}, not the [T, E] = [{t}, {e}] scores"
    if kk != k or dim not in (-1, 1) or largest is not True:
        return None, f"top-k(k={kk}, dim={dim}, largest={largest}) is not the largest {k} over the experts"
    if fu.op_name(fu.peel_casts(scores)) in LOGITS:
        return None, "top-k ranks the raw router logits: rounding needs probabilities to weight the pairs it adds"
    return scores, ""


def _module_of(ids: fx.Node, output: fx.Node) -> str:
    """The deepest module that contains both the router's result and the combine: the MoE block."""
    a, b = fu.module_stack(ids), fu.module_stack(output)
    common = [p for p, q in zip(a, b) if p == q]
    return common[-1] if common else fu.module_path(output)


def assemble(d: Dispatch, mms: list[fx.Node], ids: fx.Node, weights: fx.Node, output: fx.Node,
             activation: Activation, e: int, k: int, h: int, i: int, n1: int, t: int) -> Region:
    """The Region of a matched layer, whichever front end matched it: closed and convex from its boundary
    (tokens, routing, expert weights) to `output`, with its biases, a shared expert added to its output when
    one is there and fits, and its spec. Raises `Reject`."""
    module = _module_of(ids, output)
    boundary = [d.x, ids, weights, *fu.nodes_of(d.w1), *fu.nodes_of(d.w2), *fu.nodes_of(d.w3)]
    routed_output = output
    dtype = d.dtype or fu.tensor(fu.nodes_of(d.w1)[0]).dtype
    shared = _shared_expert(output, d.x, h, dtype)
    if shared is not None:
        branch, shared_spec, layer_output = shared
        try:  # the same checks over the routed and shared nodes together: closed, convex, no masking
            nodes, b1, b2, extra = _region_nodes(layer_output, boundary + branch.inputs, d, mms, e, n1, h)
            output = layer_output
        except Reject as r:  # e.g. the shared MLP's interior is used elsewhere: it stays in the graph, as before
            log.info("shared expert at %s left in the graph: %s", module, r)
            shared = None
    if shared is None:
        nodes, b1, b2, extra = _region_nodes(output, boundary, d, mms, e, n1, h)
    if d.w3 is not None and b1 is not None:
        raise Reject(Reason.UNSUPPORTED_FORM, b1, "a bias on gate and up projections held as separate weights")
    if d.input_scores is not None:
        _check_input_weighting(activation, k, b1 is not None or b2 is not None, output)
    out_val = fu.tensor(routed_output)
    shared_weights = shared[0].inputs[1:] if shared is not None else []
    needs_grad = torch.is_grad_enabled() and any(
        getattr(fu.tensor(v), "requires_grad", False)
        for v in (output, d.x, weights, *boundary[3:], b1, b2, *shared_weights) if v is not None
    )
    spec = MoESpec(
        num_experts=e, top_k=k, hidden=h, intermediate=i, up_rows=n1, activation=activation,
        dtype=_dtype_name(dtype), out_dtype=_dtype_name(out_val.dtype, "the layer's output"),
        w1_bias=b1 is not None, w2_bias=b2 is not None, router=_router_description(ids, weights),
        weight_on_input=d.input_scores is not None, shared=shared[1] if shared is not None else None,
        w3=d.w3 is not None,
    )
    scores, scores_missing = _router_scores(ids, t, e, k)
    return Region(spec, module, output, nodes, d.x, ids, weights, d.w1, d.w2, d.w1_transposed, d.w2_transposed,
                  b1, b2, extra, needs_grad, weight_on_input=d.input_scores is not None,
                  scores=scores, scores_missing=scores_missing, shared=shared[0] if shared is not None else None,
                  w3=d.w3, w3_transposed=d.w3_transposed)


def _region_nodes(output: fx.Node, boundary: list[fx.Node], d: Dispatch, mms: list[fx.Node], e: int, n1: int,
                  h: int) -> tuple[list[fx.Node], fx.Node | None, fx.Node | None, list[fx.Node]]:
    """(nodes, b1, b2, extra inputs) of the region from `boundary` to `output`; raises `Reject` unless it is
    closed (reads only the boundary, per-expert biases and sizes), convex and free of masking ops."""
    nodes = _close_region(output, boundary)
    b1 = b2 = None
    extra: list[fx.Node] = []
    inside = set(nodes)
    _capacity(nodes)
    for n in nodes:
        if fu.op_name(n) in _MASKING and isinstance(fu.value(n), torch.Tensor) and n not in d.selection:
            raise Reject(Reason.UNSUPPORTED_OP, n, f"{fu.op_name(n)} masks or reroutes pairs inside the expert path")
        for inp in n.all_input_nodes:
            if inp in inside or inp in boundary or inp in extra or inp in (b1, b2):
                continue
            s = fu.shape(inp)
            role = _bias_role(inp, d.up_out, d.down_out or mms[1]) if inp.op == "placeholder" else None
            if role == "b1" and s == (e, n1) and b1 is None:
                b1 = inp
            elif role == "b2" and s == (e, h) and b2 is None:
                b2 = inp
            elif not isinstance(fu.value(inp), torch.Tensor) or fu.op_name(n) in fu.SHAPE_ONLY:
                extra.append(inp)  # a symbolic size, or a tensor read for its shape only: kept, not replaced
            else:
                raise Reject(Reason.EXTERNAL_INPUT, n, f"{n.name} reads {inp.name} (shape {s})")
    # Routing metadata the model also uses itself (torchtitan adds each expert's token count to a buffer while
    # training) reads no token and no weight: it stays in the graph for those uses (`Region.keep`).
    data = fu.descendants([boundary[0], *boundary[3:]])  # tokens, weights, a shared expert's inputs
    for n in nodes:
        if n is output:
            continue
        escaping = [u for u in n.users if u not in inside]
        if escaping and isinstance(fu.value(n), torch.Tensor) and n in data:
            raise Reject(Reason.INTERIOR_ESCAPES, n, f"{n.name} is also used by {escaping[0].name}")
    return nodes, b1, b2, extra


_CUMSUM = {"torch.cumsum", "method:cumsum", "method:cumsum_"}


_ORDER = {"operator.lt", "operator.le", "operator.gt", "operator.ge", "method:lt", "method:gt", "method:ge",
          "method:le", "torch.lt", "torch.gt", "torch.ge", "torch.le"}


def _capacity(nodes: list[fx.Node]) -> None:
    """Raises `Reject(CAPACITY)` when the region compares a running count (a cumsum: each pair's position in its
    expert) with a bound: pairs past an expert's capacity are dropped, which exact top-k routing does not do,
    and probes with few tokens per expert would not show it."""
    inside = set(nodes)
    for n in nodes:
        if fu.op_name(n) in _ORDER and any(fu.op_name(a) in _CUMSUM for a in fu.ancestors([n]) | {n} if a in inside):
            raise Reject(Reason.CAPACITY, n, "each pair's position in its expert (a cumsum) is compared with a "
                                             "capacity: pairs over it are dropped")


_ADD = ("operator.add", "torch.add", "method:add")


_MUL = ("operator.mul", "torch.mul", "method:mul")


_SIGMOID = ("F.sigmoid", "torch.sigmoid", "method:sigmoid")


_SAME_DATA = ("method:view", "method:reshape", "torch.reshape", "method:flatten", "torch.flatten")


def _param(node) -> bool:
    """A graph parameter (placeholder or attribute): what the op may take as a shared-expert weight."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and fu.tensor(node) is not None


def _linear_of(node, sources: set[fx.Node], h: int, rows: int | None = None) -> tuple[fx.Node, fx.Node] | None:
    """(input, weight) when `node` is F.linear(input, weight) with no bias, input one of `sources` and weight a
    parameter [rows, H]."""
    if not isinstance(node, fx.Node) or fu.op_name(node) != "F.linear" or fu.arg(node, 2, "bias") is not None:
        return None
    inp, w = node.args[0], fu.arg(node, 1, "weight")
    ws = fu.shape(w) if _param(w) else None
    if inp not in sources or ws is None or len(ws) != 2 or ws[1] != h or (rows is not None and ws[0] != rows):
        return None
    return inp, w


def _shared_expert(routed: fx.Node, x: fx.Node, h: int, dtype: torch.dtype):
    """(SharedBranch, SharedExpert, the layer's output) when the routed output [T, H] (through views) is added
    to a dense MLP of the tokens — Linear → activation → Linear, optionally × sigmoid(Linear(x)) — whose
    weights are parameters, all in `dtype`; None otherwise (the shared expert, if any, then stays in the graph
    beside the op). The layer's output is the add, or with `shared.add_(routed)` (Llama4) the shared output
    itself, which the in-place add updates (the region check pulls the add_ in with it)."""
    cur = routed
    for _ in range(4):  # DeepSeek-V3 views the routed [T, H] back to [B, S, H] before the add
        users = list(cur.users)
        if len(users) != 1:
            return None
        if fu.op_name(users[0]) in _SAME_DATA and (fu.shape(users[0]) or (None,))[-1] == h:
            cur = users[0]
            continue
        break
    add = users[0]
    in_place = fu.op_name(add) == "method:add_"
    if (fu.op_name(add) not in _ADD and not in_place) or len(add.args) != 2 or add.kwargs or cur not in add.args:
        return None
    if in_place and add.args[1] is not cur:
        return None  # routed.add_(shared) would update the routed output, a value inside the region
    other = add.args[1] if add.args[0] is cur else add.args[0]
    if not isinstance(other, fx.Node) or other is cur or fu.shape(other) != fu.shape(add):
        return None
    sources = {x}  # the tokens, and the tensors x is a view of: the same data, as the MLP may read it
    src = x
    while fu.op_name(src) in _SAME_DATA and isinstance(src.args[0], fx.Node):
        src = src.args[0]
        sources.add(src)
    gate = gate_in = None
    mlp = other
    if fu.op_name(other) in _MUL and len(other.args) == 2 and not other.kwargs:
        for g, m in (other.args, other.args[::-1]):
            if isinstance(g, fx.Node) and fu.op_name(g) in _SIGMOID and _linear_of(g.args[0], sources, h, 1):
                (gate_in, gate), mlp = _linear_of(g.args[0], sources, h, 1), m
                break
        else:
            return None
    if not isinstance(mlp, fx.Node) or fu.op_name(mlp) != "F.linear" or fu.arg(mlp, 2, "bias") is not None:
        return None  # the down projection, without bias (a biased shared MLP stays in the graph)
    a, w2 = mlp.args[0], fu.arg(mlp, 1, "weight")
    if not _param(w2) or not isinstance(a, fx.Node):
        return None
    order = {n: j for j, n in enumerate(routed.graph.nodes)}
    ups = sorted((n for n in fu.ancestors([a]) | {a} if _linear_of(n, sources, h)), key=order.__getitem__)
    inputs = {n.args[0] for n in ups} | ({gate_in} if gate is not None else set())
    if len(ups) not in (1, 2) or len(inputs) != 1:
        return None
    try:
        if len(ups) == 1:  # one up-projection, read whole or in slices (chunk, [..., a:b])
            activation, i = activation_between(ups[0], a)
        else:  # gate and up as two linears (Qwen2-MoE, DeepSeek-V3): variable j reads the rows of linear j
            i = fu.shape(ups[0])[-1]
            if fu.shape(ups[1])[-1] != i:
                return None
            activation = activation_of_pair(ups, a, i)
    except Reject as exc:
        log.info("shared expert beside %s: activation not liftable: %s", routed.name, exc)
        return None
    weights = [fu.arg(n, 1, "weight") for n in ups]
    if fu.shape(w2) != (h, i) or fu.shape(a)[-1] != i:
        return None
    if any(fu.tensor(n).dtype != dtype for n in [x, *inputs, *weights, w2, gate, add, routed] if n is not None):
        return None  # one dtype throughout, as the op computes it (mixed precision stays in the graph)
    up_rows = sum(fu.shape(w)[0] for w in weights)
    branch = SharedBranch(inputs.pop(), weights[0], weights[1] if len(weights) == 2 else None, w2, gate, routed)
    return branch, SharedExpert(i, up_rows, activation, gate is not None), other if in_place else add


def _check_input_weighting(activation: Activation, k: int, has_bias: bool, output: fx.Node) -> None:
    """Σ_e expert_e(s[t,e]·x) over every expert equals the op on (s[t,id]·x, id, weight 1) when K = 1 and
    an expert maps 0 to 0 (no biases, activation(0) = 0). For K > 1, Σ_k expert(w_k·x) is not one weighted
    sum of expert(x), so such a layer is left as it is (expanding each token into K rows would be exact but
    costs K copies of x; no model needs it)."""
    if k != 1:
        raise Reject(Reason.INPUT_WEIGHTING, output, f"routing weights scale the expert input with top-k = {k} > 1")
    if has_bias:
        raise Reject(Reason.INPUT_WEIGHTING, output, "experts with biases do not map a zero-scaled input to 0")
    at_zero = _expr.torch_fn(activation.expr, activation.num_inputs)(*[torch.zeros(1)] * activation.num_inputs)
    if at_zero.item() != 0:
        raise Reject(Reason.INPUT_WEIGHTING, output, f"activation(0) = {at_zero.item()}: experts off the top-k "
                                                     "would add to the output")


def _dtype_name(dtype: torch.dtype, what: str = "expert weights") -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise Reject(Reason.SHAPE, "-", f"{what} in {name}; moefuse supports float32, float16, bfloat16")
    return name
