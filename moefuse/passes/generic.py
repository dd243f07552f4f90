"""generic: an MoE region from the roles of its expert contractions, whatever the code's spelling.

Every form (sorted rows + grouped mm, per-pair gathered weights, every expert on every token) shares these
boundaries, so code from any codebase is matched by meaning:
  1. experts — a *down* contraction whose rows are computed elementwise (the activation) from one or two *up*
     contractions of the same E experts (`contraction.expert_contractions` says which weight dim each
     contracts, so the einsum letters, transposes and `W[ids]` gathers of the spelling do not matter);
     two up contractions are gate and up held as separate weights (w1, w3);
  2. routing — the last top-k (or argmax / max / descending sort cut to K) over the E experts before them: its
     indices are the ids, K its k (top-1 picks joined by cat count as one; so do int [.., K] ids passed in);
  3. tokens — the last [T, H] value the up contractions read through float values (the router's input is
     reached only through the int ids, so it is never mistaken for them);
  4. output — the first [T, H] value after the down contraction that is not merely an elementwise image of
     its expert-ordered rows; the routing weights are the last [T·K] float value carried from the router's
     scores before the dispatch (not through an index, a sort, a shape-only factory or a scatter by the ids).
What happens between these boundaries (sort and counts by any spelling, padding, the un-permute, where the
weights multiply, how the K rows are summed) is the region's business: the compiler's verification runs it
against the fused op before any rewrite. Structure the probes could miss is refused here: capacity limits
(a cumsum of expert positions compared with a bound) and scores that scale the expert *input*.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from moefuse.passes import assemble as asm
from moefuse.passes import fxutil as fu
from moefuse.passes.activation import _RULES as _ELEMENTWISE_RULES
from moefuse.passes.contraction import Contraction, expert_contractions
from moefuse.passes.region import Reason, Region, Reject

log = logging.getLogger("moefuse.detect")

_LAYOUT = {"method:view", "method:reshape", "torch.reshape", "method:flatten", "torch.flatten", "method:unsqueeze",
           "torch.unsqueeze", "method:squeeze", "torch.squeeze", "method:contiguous", "method:chunk", "torch.chunk",
           "method:split", "torch.split", "method:to", "method:float", "method:half", "method:bfloat16",
           "method:type_as"}
_TOPK = {"torch.topk", "method:topk"}
_MAX = {"torch.max", "method:max"}
_ARGMAX = {"torch.argmax", "method:argmax"}
_SCATTER = {"torch.scatter", "method:scatter", "method:scatter_", "torch.index_put", "method:index_put",
            "method:index_put_", "setitem"}
_JOIN = {"torch.cat", "torch.concat", "torch.concatenate", "torch.stack"}
_SORT = {"torch.sort", "method:sort", "torch.argsort", "method:argsort", "torch.msort"}


def _elementwise_or_layout(node: fx.Node) -> bool:
    """A step the activation between the expert matmuls may take: an elementwise op the activation lifter
    knows, a slice, or a layout change."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = fu.op_name(node)
    if name == "getitem":
        idx = node.args[1]
        return not any(isinstance(i, fx.Node) for i in (idx if isinstance(idx, (tuple, list)) else (idx,)))
    return name in _LAYOUT or node.target in _ELEMENTWISE_RULES


def blocks(contractions: list[Contraction]) -> list[tuple[list[Contraction], Contraction]]:
    """(up contractions, down contraction) for every down: a contraction whose rows come, through elementwise
    and layout steps only, from other expert contractions with the same number of experts."""
    by_node = {c.node: c for c in contractions}
    found = []
    for down in contractions:
        products = {n for n, c in by_node.items() if c.num_experts == down.num_experts and c is not down}
        ups = [by_node[n] for n in feeding(down.operand, products)]
        if ups:
            found.append((ups, down))
    return found


def feeding(start: fx.Node, products: set[fx.Node]) -> list[fx.Node]:
    """The nodes of `products` that `start` is computed from through elementwise and layout steps only (the up
    products an activation combines), in graph order."""
    found, seen, stack = [], set(), [start]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n in products:
            found.append(n)
        elif _elementwise_or_layout(n):
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _forward(node: fx.Node) -> fx.Node:
    """`node` followed through single-user squeezes and views (a bmm's [S, N, 1] back to [S, N])."""
    while len(node.users) == 1:
        u = next(iter(node.users))
        if fu.op_name(u) not in ("method:squeeze", "torch.squeeze", "method:view", "method:reshape", "torch.reshape"):
            break
        node = u
    return node


def _routing(down: Contraction, e: int) -> tuple[fx.Node, int]:
    """(the expert ids, K): the indices of the last top-k / argmax / max over E experts before `down`."""
    best = None
    for n in down.node.graph.nodes:
        if n is down.node:
            break
        name = fu.op_name(n)
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if src is None or (fu.shape(src) or (None,))[-1] != e or not fu.is_float(src):
            continue
        if name in _TOPK and fu.arg(n, 2, "dim", -1) in (-1, len(fu.shape(src)) - 1):
            ids = next((u for u in n.users if fu.op_name(u) == "getitem" and u.args[1] == 1), None)
            if ids is not None and fu.arg(n, 3, "largest", True) is True:
                best = (ids, fu.arg(n, 1, "k"))
        elif name in _MAX and fu.arg(n, 1, "dim") in (-1, len(fu.shape(src)) - 1):
            ids = next((u for u in n.users if fu.op_name(u) == "getitem" and u.args[1] == 1), None)
            if ids is not None:
                best = (ids, 1)
        elif name in _ARGMAX and fu.arg(n, 1, "dim") in (-1, len(fu.shape(src)) - 1):
            best = (n, 1)
        elif name in _SORT and fu.arg(n, 1, "dim", -1) in (-1, len(fu.shape(src)) - 1):
            best = _sorted_top(n, name) or best
    if best is not None:  # top-1 picks joined into [T, K] ids (PhiMoE's sparsemixer: two max, then cat)
        cur = best[0]
        for _ in range(4):
            joins = [u for u in cur.users if fu.op_name(u) in _JOIN and fu.is_int(u)]
            views = [u for u in cur.users if fu.is_view(u) and fu.is_int(u)]
            if len(joins) == 1:
                cur = joins[0]
                best = cur, fu.shape(cur)[-1]
            elif len(views) == 1 and not joins:
                cur = views[0]
            else:
                break
    if best is None:  # routing passed in (an experts module compiled alone, a router run elsewhere): an int
        # [..., K] graph input the experts' dispatch reads, K ≤ E
        reached = fu.ancestors([down.node])
        inputs = [n for n in down.node.graph.nodes if n.op == "placeholder" and n in reached and fu.is_int(n)
                  and len(fu.shape(n) or ()) >= 2 and fu.shape(n)[-1] <= e]
        if len(inputs) == 1:
            best = (inputs[0], fu.shape(inputs[0])[-1])
    if best is None or not isinstance(best[1], int):
        raise Reject(Reason.NO_ROUTING_IDS, down.node, f"no top-k, argmax or max over the {e} experts before them in "
                                                       "this graph, and no [.., K] expert ids among its inputs: the "
                                                       "routing comes from outside it (a graph break between router "
                                                       "and experts?)")
    return best


def _sorted_top(sort: fx.Node, name: str) -> tuple[fx.Node, int] | None:
    """(ids, K) when a descending sort's indices are cut to their first K along the experts: `argsort(s,
    descending=True)[..., :K]` is top-k spelled with a sort."""
    if fu.arg(sort, 2, "descending", False) is not True:
        return None
    indices = sort if "argsort" in name else next(
        (u for u in sort.users if fu.op_name(u) == "getitem" and u.args[1] == 1), None)
    for u in list(indices.users) if indices is not None else []:
        idx = u.args[1] if fu.op_name(u) == "getitem" else None
        last = idx[-1] if isinstance(idx, tuple) else idx
        lead = idx[:-1] if isinstance(idx, tuple) else ()
        if (isinstance(last, slice) and last.start in (None, 0) and isinstance(last.stop, int) and last.step in (None, 1)
                and all(i is Ellipsis or i == slice(None) for i in lead)
                and (not lead or lead[0] is Ellipsis or len(idx) == len(fu.shape(indices)))):
            return u, last.stop
    return None


def _latest(nodes, order) -> fx.Node | None:
    nodes = list(nodes)
    return max(nodes, key=order.__getitem__) if nodes else None


def match(ups: list[Contraction], down: Contraction) -> Region:
    """The region of one (ups, down) block; raises `Reject`."""
    graph = down.node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    e = down.num_experts
    if len(ups) > 2:
        raise Reject(Reason.UNSUPPORTED_FORM, down.node, f"{len(ups)} up projections feed one down projection")
    h = ups[0].in_features
    if any(u.in_features != h for u in ups) or down.out_features != h:
        raise Reject(Reason.SHAPE, down.node, f"the up projections read {[u.in_features for u in ups]} features "
                                              f"and the down projection writes {down.out_features}")
    # ---- activation: over slices of one up projection, or over two (gate and up held apart) ----
    up_outs = [_forward(u.node) for u in ups]
    down_in = fu.peel(down.operand, {"method:unsqueeze", "torch.unsqueeze", "method:view", "method:reshape"})
    if len(ups) == 1:
        activation, i = asm.activation_between(asm._after_bias(up_outs[0]), down_in)
        n1 = ups[0].out_features
    else:
        i = ups[0].out_features
        if ups[1].out_features != i:
            raise Reject(Reason.SHAPE, ups[1].node, f"gate and up projections of widths {i}, {ups[1].out_features}")
        activation, n1 = asm.activation_of_pair(up_outs, down_in, i), 2 * i
    if down.in_features != i:
        raise Reject(Reason.SHAPE, down.node, f"the down projection reads {down.in_features} features, the "
                                              f"activation gives {i}")
    # ---- routing ids, tokens ----
    ids, k = _routing(down, e)
    t = (fu.numel(ids) or 0) // k
    from_ids = fu.descendants([ids])
    # what the up products read through float values: the tokens' path, not the routing's (indices are int);
    # the tokens are read by every up product (gate and up may each make their own view of them)
    x, reads = tokens([u.operand for u in ups], from_ids, t, h, order)
    # ---- output and routing weights ----
    expert_path = fu.descendants([u.node for u in ups])
    after_sort = fu.descendants(n for n in from_ids if fu.op_name(n) in _SORT)  # this layer's sort
    scores = _scores_of(ids)
    # values scattered *by* the ids are indexed by expert, not by slot (with K = E a dense [T, E] gate matrix
    # has the weights' size): never the [T, K] weights
    by_expert = {n for n in from_ids if fu.op_name(n) in _SCATTER}
    by_expert |= fu.descendants(by_expert)
    pure = _elementwise_image(down.node)
    # The layer's output is the first value after the experts that the routing weights reach (K = 1 can give
    # expert-ordered rows the output's shape: those are skipped). Later values are never tried: one that
    # closes only because it takes in more of the model (`out + a.mean()`) is not this layer.
    first_reject = None
    for out in sorted(fu.descendants([down.node]), key=order.__getitem__)[:64]:
        if out in pure or not fu.is_float(out) or fu.shape(out) not in ((t, h), fu.shape(x)) or _blank(out):
            continue
        anc = fu.ancestors([out])
        asm._capacity(sorted(anc & from_ids, key=order.__getitem__))  # before the weights: a capacity's masks use them
        weights = routing_weights(anc - after_sort - by_expert, t * k, expert_path | (reads - from_ids), scores, order)
        if weights is None:
            first_reject = first_reject or Reject(Reason.NO_ROUTING_WEIGHTS, out, f"no [T={t}, K={k}] routing weights "
                                                                                  "reach the combine")
            continue
        if weights in reads:
            raise Reject(Reason.INPUT_WEIGHTING, weights, f"the routing weights scale the expert input with top-k = "
                                                          f"{k}: the fused op applies them to the expert output")
        while len(out.users) == 1 and fu.is_cast(next(iter(out.users))):  # back to the layer's dtype
            out = next(iter(out.users))
        return _region(ups, down, x, ids, weights, out, activation, e, k, h, i, n1)
    raise first_reject or Reject(Reason.NO_COMBINE, down.node, f"no [T={t}, H={h}] output after the experts")


def tokens(up_operands: list[fx.Node], from_ids: set[fx.Node], t: int, h: int, order: dict):
    """(x, what the up products read): the last [T, H] value every up product reads through float values (the
    tokens' path, not the routing's: indices are int; gate and up may each make their own view of x) that is
    not computed from the ids. Raises `Reject`."""
    per_up = [_float_sources(op) for op in up_operands]
    common = set.intersection(*per_up)
    x = _latest((n for n in common if fu.is_float(n) and n not in from_ids and (fu.shape(n) or (None,))[-1] == h
                 and fu.numel(n) == t * h and n.op != "get_attr"), order)
    if x is None:
        raise Reject(Reason.NO_TOKENS, up_operands[0], f"no [T={t}, H={h}] token matrix feeds the up projections")
    return x, set().union(*per_up)


def routing_weights(candidates: set[fx.Node], size: int, excluded: set[fx.Node], scores: set[fx.Node],
                    order: dict) -> fx.Node | None:
    """The last float value of `size` (T·K) elements among `candidates`, outside `excluded`, carried from the
    router's `scores`."""
    return _latest((n for n in candidates if fu.is_float(n) and fu.numel(n) == size and n not in excluded
                    and _carries(n, scores)), order)


def _float_sources(node: fx.Node) -> set[fx.Node]:
    """`node` and every value it is computed from through float values."""
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(a for a in n.all_input_nodes if fu.is_float(a))
    return found


def _blank(node: fx.Node) -> bool:
    """A buffer made from a shape (`zeros_like(y)`) that nothing fills in place: the layer's output is what is
    computed into it (`index_copy`, `scatter`), not the buffer (K = 1 gives it the output's shape)."""
    return fu.op_name(node) in fu.SHAPE_ONLY and not any(fu.is_mutation(u) and u.args[0] is node for u in node.users)


def _scores_of(ids: fx.Node) -> set[fx.Node]:
    """The router as far as values go: the top-k (argmax, max) node that made `ids`, the scores it ranked, and
    the float values those were computed from back to the router's logits (a correction bias or a group mask
    may sit between the scores the weights come from and the ones top-k ranked, as in DeepSeek-V3)."""
    selections, seen, stack = set(), set(), [ids]
    while stack:  # back through the int ids (joins, views) to every selection that picked them
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if fu.op_name(n) in _TOPK | _MAX | _ARGMAX | _SORT:
            selections.add(n)
        else:
            stack.extend(a for a in n.all_input_nodes if fu.is_int(a) or fu.op_name(a) in _TOPK | _MAX | _SORT)
    if ids.op == "placeholder":  # routing passed in: its weights are graph inputs too
        return {ids} | {n for n in ids.graph.nodes if n.op == "placeholder" and fu.is_float(n)}
    found = set(selections)
    stack = [a for src in selections for a in src.all_input_nodes if fu.is_float(a)]
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        if fu.op_name(n) not in asm.LOGITS:
            stack.extend(a for a in n.all_input_nodes if fu.is_float(a))
    return found


def _carries(node: fx.Node, scores: set[fx.Node]) -> bool:
    """Whether `node`'s values come from the router's scores, through float data: not through an index (sorted
    expert ids cast to float for histc) nor through a factory that reads only a shape (`ones_like(weights)`)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in scores:
            return True
        if n in seen or fu.op_name(n) in fu.SHAPE_ONLY:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if fu.is_float(a) or a in scores)
    return False


def _elementwise_image(node: fx.Node) -> set[fx.Node]:
    """Values computed from `node` by elementwise and layout steps only: still one row per expert pair, in the
    experts' order (never the layer's output, even when K = 1 gives them the output's shape)."""
    image, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in image and _elementwise_or_layout(u):
                image.add(u)
                stack.append(u)
    return image


def _region(ups, down, x, ids, weights, out, activation, e, k, h, i, n1) -> Region:
    w1, w3 = ups[0], ups[1] if len(ups) == 2 else None
    # What the op computes in: the products' dtype where the code casts the weights down for them (torchtitan's
    # bf16 experts of an fp32 model); the weights' own where it casts up (transformers' fp32 fallback for fp16
    # grouped mm on the CPU), since the op accumulates in fp32 anyway and a per-call upcast copy buys nothing.
    dtypes = {min(c.dtype, fu.tensor(c.weight).dtype, key=lambda t: torch.finfo(t).bits) for c in ups + [down]}
    if len(dtypes) != 1:
        raise Reject(Reason.SHAPE, down.node, f"the expert products compute in {sorted(map(str, dtypes))}")
    dispatch = asm.Dispatch("expert roles", x, ids, w1.weight, down.weight, w1.transposed, down.transposed,
                           up_out=_forward(w1.node), down_in=down.operand, down_out=_forward(down.node),
                           w3=w3.weight if w3 is not None else None, w3_transposed=bool(w3 and w3.transposed),
                           dtype=dtypes.pop())
    return asm.assemble(dispatch, [w1.node, down.node], ids, weights, out, activation, e, k, h, i, n1,
                      fu.numel(ids) // k)


def find(graph: fx.Graph, claimed: set[fx.Node]):
    """Regions (and rejections) for every block of expert contractions no other front end claimed."""
    for ups, down in blocks(expert_contractions(graph)):
        if down.node in claimed or any(u.node in claimed for u in ups):
            continue
        yield ups, down
