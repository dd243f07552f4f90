"""detect: find each MoE layer in a dynamo graph and describe it as a `Region` with its `MoESpec`.

Detection is anchored on the experts: a pair of expert matmuls (up, then down) whose weights are 3-D
[E, ·, ·] tensors. A front end per expert form (`_FORMS`) finds, for its pair, the tokens X, the top-k ids
and the two weight operands; everything after that is shared:
  1. the activation between the matmuls is lifted into an expression over slices of the up-projection
     (moefuse.passes.activation) — any elementwise activation, no fixed list;
  2. the combine is followed from the down-projection to the first per-token [T, H] value after the
     reduction over experts (the region's output), and the routing weights are found where it multiplies;
  3. the region is every node between those inputs and the output: it must read nothing else (except
     per-expert biases and symbolic sizes), and nothing inside it may be used outside it;
  4. a shared expert whose output is added to the routed output (a dense Linear → act → Linear of the same
     tokens, optionally × sigmoid(Linear(x))) joins the region when the region stays closed and convex with it
     (`_shared_expert`); its activation is lifted as in 1 (E = 1). Otherwise it stays beside the op.
The router itself (linear → softmax/sigmoid → top-k → normalise …) stays in the graph: the region starts at
its results, which is what makes any routing rule work.

Each front end either returns facts or raises `Reject`; a region that fails a check is reported with a
typed reason and left untouched. Semantics the structure does not pin down (gate/up order, casts, the
combine's arithmetic) are checked by the compiler's verification step before any rewrite.
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
from moefuse.passes.region import Reason, Region, Reject, Rejection, SharedBranch
from moefuse.spec import Activation, MoESpec, SharedExpert

log = logging.getLogger("moefuse.detect")

GROUPED_MM = {"transformers::grouped_mm_fallback", "aten::_grouped_mm", "torch._grouped_mm", "F.grouped_mm",
              "torch.grouped_mm"}
# Ops whose presence inside a region means data-dependent masking (capacity limits, EP sentinels) that the
# fused op does not model; a region containing one is rejected rather than guessed at.
_MASKING = {"operator.lt", "operator.le", "operator.gt", "operator.ge", "operator.eq", "operator.ne",
            "torch.where", "method:masked_fill", "method:masked_fill_", "torch.masked_fill", "method:lt",
            "method:gt", "method:ge", "method:le", "method:eq", "method:ne", "torch.lt", "torch.gt", "torch.ge",
            "torch.le", "torch.eq", "torch.ne", "torch.nonzero", "method:nonzero", "torch.topk", "method:topk"}
# Factories that read only the shape/dtype/device of their input: an external input of one is not a value
# the region computes with.
_SHAPE_ONLY = {"torch.zeros_like", "torch.empty_like", "torch.ones_like", "torch.full_like", "method:new_zeros",
               "method:new_empty", "method:new_ones", "method:new_full"}
_REDUCE_OVER_EXPERTS = {"method:sum", "torch.sum", "method:index_add_", "method:index_add", "torch.index_add",
                        "method:scatter_add_", "method:scatter_add", "torch.scatter_add"}


@dataclass
class _Dispatch:
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


# ----------------------------------------------------------------------------------------------------------
# Front ends, one per expert form
# ----------------------------------------------------------------------------------------------------------


def _grouped_pairs(graph: fx.Graph):
    """transformers' grouped_mm experts: sort ids → gather X → grouped mm → act → grouped mm (same offsets)."""
    by_offs: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if fu.op_name(n) in GROUPED_MM:
            offs = fu.arg(n, 2, "offs")
            if isinstance(offs, fx.Node):
                by_offs.setdefault(offs, []).append(n)
    for offs, mms in by_offs.items():
        yield "grouped_mm", offs, mms


def _match_grouped(offs: fx.Node, mms: list[fx.Node]) -> _Dispatch:
    if len(mms) != 2:
        raise Reject(Reason.UNSUPPORTED_FORM, mms[0], f"{len(mms)} grouped matmuls share offsets {offs.name}; expected 2")
    up, down = mms  # graph order: the up projection comes first
    gathered = fu.peel_casts(up.args[0])
    if fu.op_name(gathered) != "getitem" or not isinstance(gathered.args[1], fx.Node):
        raise Reject(Reason.NO_TOKENS, up, "the up projection does not read rows gathered from a token matrix")
    x, row_index = gathered.args
    if fu.op_name(row_index) != "operator.floordiv" or not isinstance(row_index.args[1], int):
        raise Reject(Reason.NO_TOKENS, gathered, "rows are not gathered as x[perm // K]")
    perm, k = row_index.args
    if fu.op_name(perm) != "getitem" or perm.args[1] != 1 or fu.op_name(perm.args[0]) not in ("torch.sort", "method:sort"):
        raise Reject(Reason.NO_ROUTING_IDS, row_index, "the gather index is not the permutation of a sort")
    sort = perm.args[0]
    ids = fu.peel_layout(sort.args[0])
    if not fu.is_int(ids) or len(fu.shape(ids)) != 2 or fu.shape(ids)[1] != k:
        raise Reject(Reason.NO_ROUTING_IDS, sort, f"the sorted ids do not come from a [T, {k}] integer tensor")
    if sort not in fu.ancestors([offs]):
        raise Reject(Reason.UNSUPPORTED_FORM, offs, "the grouped-mm offsets are not computed from the sorted ids")
    return _Dispatch("grouped_mm", x, ids, fu.arg(up, 1, "weight"), fu.arg(down, 1, "weight"), True, True,
                     up_out=up, down_in=fu.peel_casts(down.args[0]))


def _dense_pairs(graph: fx.Graph):
    """Every expert on every token: einsum('th,enh->ten', x, w1) … einsum('ten,ehn->teh', a, w2)."""
    ups, downs = [], []
    for n in graph.nodes:
        if fu.op_name(n) == "torch.einsum" and len(n.args) == 3 and isinstance(n.args[0], str):
            eq = n.args[0].replace(" ", "")
            (lhs, w), out = eq.split("->")[0].split(","), eq.split("->")[1]
            if len(lhs) == 2 and len(w) == 3 and len(out) == 3:
                ups.append(n)
            elif len(lhs) == 3 and len(w) == 3 and len(out) == 3:
                downs.append(n)
    for down in downs:
        for up in reversed(ups):  # the nearest up projection before this down projection
            if up in fu.ancestors([down]):
                yield "dense_einsum", up, [up, down]
                break


def _match_dense(up: fx.Node, mms: list[fx.Node]) -> _Dispatch:
    _, down = mms

    def orientation(node, a_letters):
        eq = node.args[0].replace(" ", "")
        (a, w), out = eq.split("->")[0].split(","), eq.split("->")[1]
        t, e = a[0], w[0]  # tokens lead x; the expert dim leads the weight
        contract = next((c for c in w if c in a and c not in out), None)
        out_dim = next((c for c in w if c not in (e, contract)), None)
        if None in (contract, out_dim) or out != f"{t}{e}{out_dim}" or a != a_letters(t, e, contract):
            raise Reject(Reason.UNSUPPORTED_FORM, node, f"einsum {eq!r} is not a per-expert x·Wᵀ")
        return w == f"{e}{contract}{out_dim}"  # [E, in, out] → transposed

    t1 = orientation(up, lambda t, e, c: f"{t}{c}")
    t2 = orientation(down, lambda t, e, c: f"{t}{e}{c}")
    x = up.args[1]
    return _Dispatch("dense_einsum", x, None, up.args[2], down.args[2], t1, t2, up_out=up,
                     down_in=fu.peel_casts(down.args[1]))


def _weight_gather(node) -> tuple[fx.Node, fx.Node] | None:
    """(weight, index) when `node` is `weight[index]`: a 3-D per-expert weight gathered by flat expert ids."""
    if isinstance(node, fx.Node) and fu.op_name(node) == "getitem" and isinstance(node.args[1], fx.Node):
        w, idx = node.args
        if len(fu.shape(w) or ()) == 3 and fu.is_int(idx) and len(fu.shape(idx)) == 1:
            return w, idx
    return None


def _batched_pairs(graph: fx.Graph):
    """transformers' batched_mm experts: every pair p multiplies its own gathered weight W[ids[p]] (bmm)."""
    by_ids: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if fu.op_name(n) in ("torch.bmm", "torch.matmul", "operator.matmul") and len(n.args) == 2:
            found = _weight_gather(n.args[0]) or _weight_gather(n.args[1])
            if found:
                by_ids.setdefault(found[1], []).append(n)
    for idx, mms in by_ids.items():
        yield "batched_mm", idx, mms


def _match_batched(idx: fx.Node, mms: list[fx.Node]) -> _Dispatch:
    if len(mms) != 2:
        raise Reject(Reason.UNSUPPORTED_FORM, mms[0], f"{len(mms)} batched matmuls gather weights by {idx.name}; expected 2")

    def sides(mm):
        """(weight, vector operand, transposed, output [S, out]) of one per-pair matmul."""
        a, b = mm.args
        if _weight_gather(a):  # bmm(W[ids], v.unsqueeze(-1)): W[e] is out × in
            w, vec, transposed = _weight_gather(a)[0], b, False
        else:  # bmm(v.unsqueeze(1), W[ids]): W[e] is in × out
            w, vec, transposed = _weight_gather(b)[0], a, True
        users = list(mm.users)
        out = users[0] if len(users) == 1 and fu.is_view(users[0]) and len(fu.shape(users[0])) == 2 else None
        if out is None:
            raise Reject(Reason.UNSUPPORTED_FORM, mm, "the per-pair matmul's output is not squeezed back to [S, out]")
        # only the unsqueeze that made the vector a matrix: peeling further could walk back into the up matmul
        return w, fu.peel_casts(fu.peel(vec, {"method:unsqueeze", "torch.unsqueeze"})), transposed, out

    w1, rows, t1, up_out = sides(mms[0])
    w2, down_in, t2, down_out = sides(mms[1])
    if fu.op_name(rows) != "method:repeat_interleave" or not isinstance(fu.arg(rows, 1, "repeats"), int):
        raise Reject(Reason.NO_TOKENS, mms[0], "the up projection does not read x.repeat_interleave(K, dim=0)")
    ids = fu.peel_layout(idx)
    k = fu.arg(rows, 1, "repeats")
    if not fu.is_int(ids) or len(fu.shape(ids)) != 2 or fu.shape(ids)[1] != k:
        raise Reject(Reason.NO_ROUTING_IDS, idx, f"the weights are not gathered by [T, {k}] integer ids")
    return _Dispatch("batched_mm", rows.args[0], ids, w1, w2, t1, t2, up_out=up_out, down_in=down_in,
                     down_out=down_out)


_BMM = ("torch.bmm", "torch.matmul", "operator.matmul")


def _stacked_bmm_pairs(graph: fx.Graph):
    """Every expert on every token as one batched matmul per projection: [E, T, in] @ W[E, in, out] (Llama4)."""
    pending = None
    for n in graph.nodes:
        if fu.op_name(n) not in _BMM or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
            continue
        if len(fu.shape(n.args[0]) or ()) != 3 or len(fu.shape(n.args[1]) or ()) != 3:
            continue
        if fu.peel_casts(n.args[1]).op not in ("placeholder", "get_attr"):
            continue  # expert weights are parameters; a computed operand is attention's q·kᵀ or p·v
        # in graph order an up projection is followed by its down projection, which depends on it
        if pending is not None and pending in fu.ancestors([n]):
            yield "dense_bmm", pending, [pending, n]
            pending = None
        else:
            pending = n


# Elementwise ops that may lie between a scatter of top-k values and the scores it makes, each as a torch
# function, to evaluate them at the scatter's fill value.
_ELEMENTWISE = {"F.sigmoid": torch.sigmoid, "torch.sigmoid": torch.sigmoid, "method:sigmoid": torch.sigmoid,
                "torch.exp": torch.exp, "method:exp": torch.exp, "F.relu": torch.relu, "torch.relu": torch.relu,
                "method:relu": torch.relu}
_SCATTER = ("method:scatter_", "method:scatter", "torch.scatter")


def _fill_value(node) -> float | None:
    """The constant every element of `node` holds when it is a filled factory (full_like(·, -inf), zeros …)."""
    name = fu.op_name(node) if isinstance(node, fx.Node) else ""
    if name in ("torch.zeros_like", "torch.zeros", "method:new_zeros"):
        return 0.0
    if name in ("torch.full_like", "torch.full", "method:new_full"):
        v = fu.arg(node, 1, "fill_value")
        return float(v) if isinstance(v, (int, float)) else None
    return None


def _scattered_topk(scores: fx.Node, t: int, e: int) -> fx.Node:
    """The [T, K] ids when `scores` [T, E] is f(scatter(fill, 1, ids, values)) for elementwise f with
    f(fill) = 0: a dense score matrix that is zero off each token's top-k experts. Raises `Reject`."""
    cur, fns = scores, []
    for _ in range(8):
        name = fu.op_name(cur)
        if fu.is_cast(cur) or name in _ELEMENTWISE:
            fns.append(_ELEMENTWISE.get(name, lambda v: v))
            cur = cur.args[0]
        else:
            break
    ids = fu.arg(cur, 2, "index") if fu.op_name(cur) in _SCATTER else None
    fill = _fill_value(cur.args[0]) if ids is not None and fu.arg(cur, 1, "dim") in (1, -1) else None
    if fill is None or not fu.is_int(ids) or len(fu.shape(ids) or ()) != 2 or fu.shape(ids)[0] != t:
        raise Reject(Reason.INPUT_WEIGHTING, scores,
                     "the scores scaling the expert input are not top-k values scattered into a constant [T, E]")
    off_topk = torch.tensor(fill)
    for fn in reversed(fns):
        off_topk = fn(off_topk)
    if off_topk.item() != 0:
        raise Reject(Reason.INPUT_WEIGHTING, scores, f"experts off the top-k get the score {off_topk.item()}, not 0")
    return ids


def _match_stacked_bmm(up: fx.Node, mms: list[fx.Node]) -> _Dispatch:
    """Llama4: routed_in = x.repeat(E, 1) * s.T.reshape(-1, 1) viewed [E, T, H] → bmm → act → bmm → view →
    sum over E. The routing weight multiplies the expert *input*; s [T, E] is zero off the top-k."""
    _, down = mms
    e = fu.shape(up.args[1])[0]
    scaled = fu.peel_layout(up.args[0])
    if fu.op_name(scaled) not in ("operator.mul", "torch.mul", "method:mul") or len(scaled.args) != 2:
        raise Reject(Reason.UNSUPPORTED_FORM, up, "dense experts whose input is not the tokens times their scores")
    for tiled, per_row in (scaled.args, reversed(scaled.args)):
        tiled = fu.peel_casts(tiled)
        if isinstance(tiled, fx.Node) and fu.op_name(tiled) == "method:repeat" and tuple(tiled.args[1:]) == (e, 1):
            break
    else:  # repeat(E, 1) tiles x: row e·T + t is token t for expert e
        raise Reject(Reason.NO_TOKENS, scaled, "the experts' input is not the tokens tiled once per expert")
    x = tiled.args[0]
    t = (fu.shape(x) or (None,))[0]
    cur, transposes = per_row, 0  # s.T.reshape(-1, 1): row e·T + t holds s[t, e]
    while isinstance(cur, fx.Node) and (fu.is_view(cur) or fu.is_cast(cur) or fu.op_name(cur) in (
            "method:transpose", "method:t", "torch.transpose", "torch.t")):
        transposes += fu.op_name(cur) in ("method:transpose", "method:t", "torch.transpose", "torch.t")
        cur = cur.args[0]
    if transposes != 1 or fu.shape(cur) != (t, e) or not fu.is_float(cur):
        raise Reject(Reason.INPUT_WEIGHTING, scaled, "the per-row scale is not a [T, E] score matrix read expert-major")
    ids = _scattered_topk(cur, t, e)
    return _Dispatch("dense_bmm", x, ids, up.args[1], down.args[1], True, True, up_out=up,
                     down_in=fu.peel_casts(down.args[0]), input_scores=cur)


_FORMS = [(_grouped_pairs, _match_grouped), (_batched_pairs, _match_batched), (_dense_pairs, _match_dense),
          (_stacked_bmm_pairs, _match_stacked_bmm)]


# ----------------------------------------------------------------------------------------------------------
# Shared: activation, combine, region, spec
# ----------------------------------------------------------------------------------------------------------


def _slice_of(node: fx.Node, up: fx.Node, n1: int):
    """(offset, step, length) when `node` reads a slice of `up`'s last dim; None when it reads `up` whole."""
    name = fu.op_name(node)
    if name == "getitem" and isinstance(node.args[0], fx.Node) and fu.op_name(node.args[0]) in ("method:chunk", "torch.chunk"):
        chunk = node.args[0]
        parts, dim = fu.arg(chunk, 1, "chunks"), fu.arg(chunk, 2, "dim", 0)
        if dim not in (-1, len(fu.shape(up)) - 1) or n1 % parts:
            raise Reject(Reason.UNSUPPORTED_ACTIVATION, chunk, "chunk is not along the last dim in equal parts")
        size = n1 // parts
        return node.args[1] * size, 1, size
    if name == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        last = idx[-1]
        lead_ok = all(i is Ellipsis or i == slice(None) for i in idx[:-1])
        if isinstance(last, slice) and lead_ok and (idx[0] is Ellipsis or len(idx) == len(fu.shape(up))):
            start, stop, step = last.indices(n1)
            return start, step, len(range(start, stop, step))
    raise Reject(Reason.UNSUPPORTED_ACTIVATION, node, f"{name} reads the up-projection in a way moefuse cannot slice")


def _activation(d: _Dispatch) -> tuple[Activation, int]:
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
        if fu.op_name(user) in ("method:chunk", "torch.chunk"):
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


def _combine(down: fx.Node, t: int, h: int) -> tuple[fx.Node, list[fx.Node]]:
    """Follow the down projection's single-user chain to the per-token [T, H] output after the reduction."""
    chain, cur, reduced = [], down, False
    for _ in range(16):
        users = [u for u in cur.users if not fu.is_mutation(u)]
        if len(users) != 1:
            raise Reject(Reason.NO_COMBINE, cur, f"{cur.name} has {len(users)} users before the combine ends")
        cur = users[0]
        chain.append(cur)
        reduced = reduced or fu.op_name(cur) in _REDUCE_OVER_EXPERTS
        if reduced and fu.shape(cur) == (t, h):
            break
    else:
        raise Reject(Reason.NO_COMBINE, down, "no per-token [T, H] output within 16 ops of the down projection")
    while len(cur.users) == 1 and fu.is_cast(next(iter(cur.users))) and fu.shape(next(iter(cur.users))) == (t, h):
        cur = next(iter(cur.users))
        chain.append(cur)
    return cur, chain


def _routing_weights(chain: list[fx.Node], t: int, k: int) -> tuple[fx.Node, fx.Node | None]:
    """The [T, K] float routing weights multiplied into the expert outputs; for a dense combine, also the ids
    scattered with them."""
    for node in chain:
        if fu.op_name(node) not in ("operator.mul", "torch.mul", "method:mul"):
            continue
        for other in node.args:
            if not isinstance(other, fx.Node) or other in chain:
                continue
            cur, ids, found = other, None, None
            for _ in range(8):
                name = fu.op_name(cur)
                if name in ("method:scatter", "torch.scatter"):  # before the shape test: with K = E, [T, E] is [T, K]
                    ids, cur = fu.arg(cur, 2, "index"), fu.arg(cur, 3, "src")
                    if not isinstance(cur, fx.Node):
                        break
                    continue
                if found is None and fu.shape(cur) == (t, k) and fu.is_float(cur):
                    found = cur
                if name == "getitem" and _tensor_indexed(cur):
                    # What was found so far is in gathered (pair) order: with K = 1, grouped_mm's
                    # `weights.reshape(-1)[perm].unsqueeze(-1)` is [T·K, 1] = [T, K] but sorted by expert.
                    found = None
                if fu.is_view(cur) or fu.is_cast(cur) or name == "getitem":
                    cur = cur.args[0]
                else:
                    break
                if not isinstance(cur, fx.Node):
                    break
            if found is not None:
                return found, ids
    raise Reject(Reason.NO_ROUTING_WEIGHTS, chain[0], "no multiplication by [T, K] routing weights in the combine")


def _tensor_indexed(getitem: fx.Node) -> bool:
    """`a[idx]` with a tensor among its indices (a gather), not only slices and integers."""
    index = getitem.args[1]
    return any(isinstance(i, fx.Node) and isinstance(fu.value(i), torch.Tensor)
               for i in (index if isinstance(index, (tuple, list)) else (index,)))


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
    graph_order = {n: i for i, n in enumerate(output.graph.nodes)}
    # Graph inputs (parameters, buffers, sizes) are never part of a region: they are read, as biases or sizes.
    return sorted((n for n in inside if n.op not in ("placeholder", "get_attr")), key=graph_order.__getitem__)


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


_LOGITS = {"F.linear", "torch.matmul", "operator.matmul", "torch.mm", "torch.addmm"}


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
    if fu.op_name(fu.peel_casts(scores)) in _LOGITS:
        return None, "top-k ranks the raw router logits: rounding needs probabilities to weight the pairs it adds"
    return scores, ""


def _module_of(ids: fx.Node, output: fx.Node) -> str:
    """The deepest module that contains both the router's result and the combine: the MoE block."""
    a, b = fu.module_stack(ids), fu.module_stack(output)
    common = [p for p, q in zip(a, b) if p == q]
    return common[-1] if common else fu.module_path(output)


def _match(d: _Dispatch, mms: list[fx.Node]) -> Region:
    x_shape, w1_shape, w2_shape = fu.shape(d.x), fu.shape(d.w1), fu.shape(d.w2)
    if x_shape is None or len(x_shape) != 2 or len(w1_shape or ()) != 3 or len(w2_shape or ()) != 3:
        raise Reject(Reason.SHAPE, mms[0], f"x {x_shape}, w1 {w1_shape}, w2 {w2_shape}: expected 2-D x and 3-D weights")
    t, h = x_shape
    e = w1_shape[0]
    n1 = w1_shape[1] if not d.w1_transposed else w1_shape[2]
    w2_out, w2_in = (w2_shape[2], w2_shape[1]) if d.w2_transposed else (w2_shape[1], w2_shape[2])
    activation, i = _activation(d)
    if w2_shape[0] != e or w2_out != h or w2_in != i:
        raise Reject(Reason.SHAPE, mms[1], f"down weights {w2_shape} do not map I={i} back to H={h} for E={e}")
    output, chain = _combine(mms[1], t, h)
    ids = d.topk_ids
    k = fu.shape(ids)[1] if ids is not None else None
    if d.input_scores is not None:  # the weights scale the expert input: the combine is a plain sum
        weights = d.input_scores
    else:
        if k is None:  # dense form: ids arrive with the weights in the combine
            k = _find_k(chain, t, e)
        weights, scattered_ids = _routing_weights(chain, t, k)
        ids = ids if ids is not None else scattered_ids
    if ids is None or not fu.is_int(ids) or fu.shape(ids) != (t, k):
        raise Reject(Reason.NO_ROUTING_IDS, output, "the combine's weights are not paired with [T, K] expert ids")
    module = _module_of(ids, output)
    boundary = [d.x, ids, weights, d.w1, d.w2]
    routed_output = output
    shared = _shared_expert(output, d.x, h, fu.tensor(d.w1).dtype)
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
    if d.input_scores is not None:
        _check_input_weighting(activation, k, b1 is not None or b2 is not None, output)
    out_val = fu.tensor(routed_output)
    shared_weights = shared[0].inputs[1:] if shared is not None else []
    needs_grad = torch.is_grad_enabled() and any(
        getattr(fu.tensor(v), "requires_grad", False)
        for v in (output, d.x, weights, d.w1, d.w2, b1, b2, *shared_weights) if v is not None
    )
    spec = MoESpec(
        num_experts=e, top_k=k, hidden=h, intermediate=i, up_rows=n1, activation=activation,
        dtype=_dtype_name(fu.tensor(d.w1).dtype), out_dtype=_dtype_name(out_val.dtype, "the layer's output"),
        w1_bias=b1 is not None, w2_bias=b2 is not None, router=_router_description(ids, weights),
        weight_on_input=d.input_scores is not None, shared=shared[1] if shared is not None else None,
    )
    scores, scores_missing = _router_scores(ids, t, e, k)
    return Region(spec, module, output, nodes, d.x, ids, weights, d.w1, d.w2, d.w1_transposed, d.w2_transposed,
                  b1, b2, extra, needs_grad, weight_on_input=d.input_scores is not None,
                  scores=scores, scores_missing=scores_missing, shared=shared[0] if shared is not None else None)


def _region_nodes(output: fx.Node, boundary: list[fx.Node], d: _Dispatch, mms: list[fx.Node], e: int, n1: int,
                  h: int) -> tuple[list[fx.Node], fx.Node | None, fx.Node | None, list[fx.Node]]:
    """(nodes, b1, b2, extra inputs) of the region from `boundary` to `output`; raises `Reject` unless it is
    closed (reads only the boundary, per-expert biases and sizes), convex and free of masking ops."""
    nodes = _close_region(output, boundary)
    b1 = b2 = None
    extra: list[fx.Node] = []
    inside = set(nodes)
    for n in nodes:
        if fu.op_name(n) in _MASKING:
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
            elif not isinstance(fu.value(inp), torch.Tensor) or fu.op_name(n) in _SHAPE_ONLY:
                extra.append(inp)  # a symbolic size, or a tensor read for its shape only: kept, not replaced
            else:
                raise Reject(Reason.EXTERNAL_INPUT, n, f"{n.name} reads {inp.name} (shape {s})")
    for n in nodes:
        if n is output:
            continue
        escaping = [u for u in n.users if u not in inside]
        if escaping and isinstance(fu.value(n), torch.Tensor):
            raise Reject(Reason.INTERIOR_ESCAPES, n, f"{n.name} is also used by {escaping[0].name}")
    return nodes, b1, b2, extra


# ----------------------------------------------------------------------------------------------------------
# The shared expert beside the routed ones
# ----------------------------------------------------------------------------------------------------------

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
            lifted = lift_activation(a, {ups[0]: _expr.variables(2)[0], ups[1]: _expr.variables(2)[1]})
            activation = Activation(_expr.to_str(lifted), ((0, 1), (i, 1)))
    except (Reject, UnsupportedActivation) as exc:
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


def _find_k(chain: list[fx.Node], t: int, e: int) -> int:
    for node in chain:
        for other in node.all_input_nodes:
            cur = other
            for _ in range(8):
                if fu.op_name(cur) in ("method:scatter", "torch.scatter"):
                    idx = fu.arg(cur, 2, "index")
                    s = fu.shape(idx)
                    if s and len(s) == 2 and s[0] == t and s[1] <= e:
                        return s[1]
                    break
                if not (fu.is_view(cur) or fu.is_cast(cur)) or not isinstance(cur.args[0], fx.Node):
                    break
                cur = cur.args[0]
    raise Reject(Reason.NO_ROUTING_IDS, chain[0], "a dense combine whose weights are not scattered from top-k ids")


def _dtype_name(dtype: torch.dtype, what: str = "expert weights") -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise Reject(Reason.SHAPE, "-", f"{what} in {name}; moefuse supports float32, float16, bfloat16")
    return name


def detect(gm: fx.GraphModule) -> tuple[list[Region], list[Rejection]]:
    """Every MoE region of the graph, and every candidate that was not taken, with its reason."""
    regions, rejections, claimed = [], [], set()
    for find, match in _FORMS:
        for form, anchor, mms in find(gm.graph):
            if any(m in claimed for m in mms):
                continue
            try:
                region = _match(match(anchor, mms), mms)
            except Reject as r:
                module = fu.module_path(mms[-1])
                rejections.append(Rejection(r.reason, r.node, module, r.detail))
                log.info("rejected %s candidate at %s: %s", form, module, r)
                continue
            owned = {n for n in region.nodes if isinstance(fu.value(n), torch.Tensor)}  # sizes may be shared
            if claimed & owned:
                rejections.append(Rejection(Reason.UNSUPPORTED_FORM, region.output.name, region.module,
                                            "overlaps a region already taken"))
                continue
            claimed |= owned
            regions.append(region)
            log.info("found %s region at %s: %s", form, region.module, region.spec.describe())
    rejections += _routing_leaving_graph(gm.graph, claimed)
    return regions, rejections


def _routing_leaving_graph(graph: fx.Graph, claimed: set[fx.Node]) -> list[Rejection]:
    """Top-k expert ids returned from the graph, not consumed by any region: the experts run after a graph
    break, in code no backend sees (transformers' experts_implementation="eager" loops over the experts)."""
    output = next(n for n in graph.nodes if n.op == "output")
    rejections = []
    for n in graph.nodes:
        if fu.op_name(n) not in ("torch.topk", "method:topk") or n in claimed:
            continue
        ids = [u for u in n.users if fu.op_name(u) == "getitem" and u.args[1] == 1]
        reach = set(ids)
        for _ in range(4):
            reach |= {u for r in reach for u in r.users if fu.is_view(u) or fu.is_cast(u)}
        if output in {u for r in reach for u in r.users}:
            rejections.append(Rejection(Reason.EXPERTS_OUTSIDE_GRAPH, n.name, fu.module_path(n)))
    return rejections
