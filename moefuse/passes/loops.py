"""loops: an MoE whose experts are separate modules, run by a per-expert loop that dynamo unrolled into the graph.

Mistral's `MoeLayer`, transformers 4.x Mixtral, litgpt's `LLaMAMoE` and most research code hold the experts as
an `nn.ModuleList` of MLPs and loop over them: select the pairs routed to expert e (`ids == e`, or row e of a
one-hot expert mask), gather their tokens (`where` / `nonzero`), run expert e's linears, scale by the routing
weight and add back (`index_add_`, `results[idx] += …`). With data-dependent ops captured, dynamo unrolls the
loop into E copies of that body. Read by meaning:
  1. every `F.linear` with a 2-D parameter weight is keyed by the selection it runs under: the nearest
     `ids == e` comparison or `mask[e]` row of a one-hot of the ids among the ancestors of its input;
  2. the selections of one ids tensor must be exactly experts 0 … E-1, each running the same MLP: one or two up
     linears (gate and up held apart) feeding a down linear through an elementwise activation, lifted once and
     equal for every expert, with the same shapes;
  3. tokens, routing weights and the output are found as `generic` finds them (the output is the buffer the
     loop accumulates into, reached through the in-place updates).
The region is then a layer with E per-expert weights of each role (`Region.per_expert`): the op runs on their
stack. That stack is a copy of every expert weight on each call — the report says so, and `moefuse.convert`
stacks them once instead. Everything else is checked by verification, as for any region.
"""
from __future__ import annotations

import torch.fx as fx

from moefuse.passes import assemble as asm
from moefuse.passes import fxutil as fu
from moefuse.passes import generic
from moefuse.passes.region import Reason, Region, Reject

EQ = {"operator.eq", "method:eq", "torch.eq"}
_ONE_HOT = {"F.one_hot", "torch.nn.functional.one_hot"}
SELECT = {"torch.where", "torch.nonzero", "method:nonzero", "torch.argwhere"}


def _linear_weight(node: fx.Node) -> fx.Node | None:
    """The 2-D parameter of `F.linear(input, weight)` without bias, else None."""
    if fu.op_name(node) != "F.linear" or fu.arg(node, 2, "bias") is not None:
        return None
    w = fu.arg(node, 1, "weight")
    t = fu.tensor(w)
    return w if w.op in ("placeholder", "get_attr") and t is not None and t.dim() == 2 else None


def _selection(node: fx.Node) -> tuple[fx.Node, int, set[fx.Node]] | None:
    """(the expert ids, e, the selecting nodes) of the nearest `ids == e` / `one_hot(ids)…[e]` above `node`."""
    seen, frontier = set(), [node]
    for _ in range(12):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                name = fu.op_name(a)
                if name in EQ and len(a.args) == 2:
                    ids, e = (a.args if isinstance(a.args[1], int) else a.args[::-1])
                    if isinstance(ids, fx.Node) and isinstance(e, int) and fu.is_int(ids):
                        return fu.peel_layout(ids), e, {a}
                if name == "getitem" and isinstance(a.args[1], int) and isinstance(a.args[0], fx.Node):
                    src = fu.peel(a.args[0], {"method:permute", "torch.permute", "method:transpose",
                                              "torch.transpose", "method:t"})
                    if fu.op_name(src) in _ONE_HOT and isinstance(src.args[0], fx.Node):
                        return fu.peel_layout(src.args[0]), a.args[1], {a, src}
                    if fu.op_name(src) in EQ and len(src.args) == 2:  # (ids[..., None] == arange(E))[..., e]
                        ids, rng = sorted(src.args, key=lambda v: fu.op_name(fu.peel_layout(v)) == "torch.arange")
                        if fu.op_name(fu.peel_layout(rng)) == "torch.arange" and fu.is_int(ids):
                            return fu.peel_layout(ids), a.args[1], {a, src}
                nxt.append(a)
        frontier = nxt
    return None


def find(graph: fx.Graph, claimed: set[fx.Node]):
    """(ids, {e: [linears of expert e]}, selecting nodes) for every unrolled per-expert loop."""
    groups: dict[fx.Node, dict[int, list[fx.Node]]] = {}
    selecting: dict[fx.Node, set[fx.Node]] = {}
    for n in graph.nodes:
        if _linear_weight(n) is None or n in claimed:
            continue
        found = _selection(n.args[0])
        if found is not None:
            ids, e, sel = found
            groups.setdefault(ids, {}).setdefault(e, []).append(n)
            selecting.setdefault(ids, set()).update(sel)
    for ids, experts in groups.items():
        if len(experts) >= 2:
            yield ids, experts, selecting[ids]


def _expert_mlp(linears: list[fx.Node], e: int):
    """(ups, down, activation, I) of one expert's linears."""
    downs = [(lin, ups) for lin in linears if (ups := generic.feeding(lin.args[0], set(linears) - {lin}))]
    if len(downs) != 1 or len(downs[0][1]) + 1 != len(linears) or len(linears) not in (2, 3):
        raise Reject(Reason.UNSUPPORTED_FORM, linears[0], f"expert {e}'s {len(linears)} linears are not up "
                                                          "projection(s) feeding one down projection")
    down, ups = downs[0]
    if len(ups) == 1:
        activation, i = asm.activation_between(ups[0], down.args[0])
    else:
        i = fu.shape(_linear_weight(ups[0]))[0]
        activation = asm.activation_of_pair(ups, down.args[0], i)
    return ups, down, activation, i


def match(ids: fx.Node, experts: dict[int, list[fx.Node]], selecting: set[fx.Node]) -> Region:
    """The region of one unrolled per-expert loop; raises `Reject`."""
    graph = ids.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    e_count = len(experts)
    if sorted(experts) != list(range(e_count)):
        raise Reject(Reason.UNSUPPORTED_FORM, ids, f"the loop selects experts {sorted(experts)}, not 0 … {e_count - 1}")
    mlps = [_expert_mlp(experts[e], e) for e in range(e_count)]
    ups0, down0, activation, i = mlps[0]
    shapes = [tuple(fu.shape(_linear_weight(n)) for n in [*ups, down]) for ups, down, _, _ in mlps]
    for e, (_, _, act, _) in enumerate(mlps):
        if act != activation or shapes[e] != shapes[0]:
            raise Reject(Reason.UNSUPPORTED_FORM, experts[e][0], f"expert {e} differs from expert 0 (activation "
                                                                 f"{act.expr} vs {activation.expr}, shapes "
                                                                 f"{shapes[e]} vs {shapes[0]})")
    h = shapes[0][-1][0]
    k = (fu.shape(ids) or (1,))[-1]
    t = (fu.numel(ids) or 0) // k
    if not fu.is_int(ids) or t == 0:
        raise Reject(Reason.NO_ROUTING_IDS, ids, "the loop's selections do not compare [T, K] expert ids")
    from_ids = fu.descendants([ids])
    x, reads = generic.tokens([u.args[0] for ups, _, _, _ in mlps for u in ups], from_ids, t, h, order)
    downs = [down for _, down, _, _ in mlps]
    after_all = set.intersection(*(fu.descendants([d]) for d in downs))
    scores = generic._scores_of(ids)
    expert_path = fu.descendants([u for ups, _, _, _ in mlps for u in ups])
    for out in sorted(after_all, key=order.__getitem__)[:64]:
        if not fu.is_float(out) or fu.shape(out) not in ((t, h), fu.shape(x)):
            continue
        anc = fu.ancestors([out]) | fu.ancestors([n for n in graph.nodes if fu.is_mutation(n) and n.args
                                                   and n.args[0] is out])
        weights = generic.routing_weights(anc, t * k, expert_path | reads | from_ids, scores, order)
        if weights is None:
            continue
        weights_of = [[_linear_weight(n) for n in role] for role in zip(*[[*ups, down] for ups, down, _, _ in mlps])]
        w1, w3 = weights_of[0], (weights_of[1] if len(ups0) == 2 else None)
        w2 = weights_of[-1]
        dispatch = asm.Dispatch("per-expert loop", x, ids, w1, w2, False, False, up_out=ups0[0],
                                down_in=down0.args[0], down_out=down0, w3=w3,
                                selection=frozenset(selecting | {u for s in selecting for u in fu.descendants([s])
                                                                 if fu.op_name(u) in SELECT}))
        n1 = 2 * i if w3 is not None else fu.shape(w1[0])[0]
        return asm.assemble(dispatch, [ups0[0], down0], ids, weights, out, activation, e_count, k, h, i, n1, t)
    raise Reject(Reason.NO_ROUTING_WEIGHTS, downs[-1], f"no [T={t}, K={k}] routing weights reach the loop's output")
