"""input_weighted: Llama4's expert form, the one the roles alone do not pin down.

Every expert runs on every token as one batched matmul per projection, `x.repeat(E, 1)` viewed [E, T, H]
@ W[E, in, out], and the routing weight multiplies the expert *input*: `s.T.reshape(-1, 1)` where s [T, E] is
the top-k scores scattered into a constant that is 0 off the top-k (after its elementwise function). The
routing weights are a dense [T, E] matrix, not [T, K] values, so `generic` (which looks for [T, K] weights
applied to the expert output) does not take it. Exact for top-1 and experts that map 0 to 0
(`assemble._check_input_weighting`); the rewrite scales x in the graph and calls the op with unit weights.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu
from moefuse.passes.assemble import Dispatch, _activation, assemble
from moefuse.passes.region import Reason, Region, Reject


_REDUCE_OVER_EXPERTS = {"method:sum", "torch.sum", "method:index_add_", "method:index_add", "torch.index_add",
                        "method:scatter_add_", "method:scatter_add", "torch.scatter_add"}


_BMM = ("torch.bmm", "torch.matmul", "operator.matmul")


def find(graph: fx.Graph):
    """Every expert on every token as one batched matmul per projection, [E, T, in] @ W[E, in, out], whose up
    projection reads the tokens times their scores (Llama4); other dense forms are `generic`'s."""
    pending = None
    for n in graph.nodes:
        if fu.op_name(n) not in _BMM or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
            continue
        if len(fu.shape(n.args[0]) or ()) != 3 or len(fu.shape(n.args[1]) or ()) != 3:
            continue
        if fu.peel_casts(n.args[1]).op not in ("placeholder", "get_attr"):
            continue  # expert weights are parameters; a computed operand is attention's q·kᵀ or p·v
        if pending is None and fu.op_name(fu.peel_layout(n.args[0])) not in ("operator.mul", "torch.mul", "method:mul"):
            continue  # an up projection of plain tokens: not this form
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


def _dispatch(up: fx.Node, mms: list[fx.Node]) -> Dispatch:
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
    return Dispatch("dense_bmm", x, ids, up.args[1], down.args[1], True, True, up_out=up,
                     down_in=fu.peel_casts(down.args[0]), input_scores=cur)


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


def _region(d: Dispatch, mms: list[fx.Node]) -> Region:
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
    output, _ = _combine(mms[1], t, h)
    ids, weights = d.topk_ids, d.input_scores  # the weights scale the expert input: the combine is a plain sum
    k = fu.shape(ids)[1]
    if not fu.is_int(ids) or fu.shape(ids) != (t, k):
        raise Reject(Reason.NO_ROUTING_IDS, output, "the input scores are not scattered from [T, K] expert ids")
    return assemble(d, mms, ids, weights, output, activation, e, k, h, i, n1, t)


def match(up: fx.Node, mms: list[fx.Node]) -> Region:
    """The Region of one (up, down) pair of stacked bmms; raises `Reject`."""
    return _region(_dispatch(up, mms), mms)
