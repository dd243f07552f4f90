"""detect: find every MoE layer in a dynamo graph and describe it as a `Region` with its `MoESpec`, or say
why not.

The passes package, by role:
  contraction.py    the normal form of expert products: each use of a 3-D weight [E, a, b], with the dim it
                    contracts read by its role, whatever the spelling (einsum, bmm, matmul, grouped mm, W[ids])
  generic.py        a layer from those roles: up/down products, top-k routing, tokens, output (most forms)
  input_weighted.py Llama4's form, whose routing weights scale the expert input as a dense [T, E] matrix
  loops.py          per-expert loops over separately held experts, unrolled into the graph by dynamo
  assemble.py       what every form builds its Region from: activation, closed region, biases, shared
                    expert, capacity check, spec
  detect.py         this file: runs the forms, keeps one reason per candidate, reports top-k routing no region
                    took (never silent)
Semantics the structure does not pin down (gate/up order, casts, the combine's arithmetic, the sort's
spelling) are checked by the compiler's verification step before any rewrite. See passes/README.md.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from moefuse.passes import assemble, generic, input_weighted, loops
from moefuse.passes import fxutil as fu
from moefuse.passes.region import Reason, Region, Reject, Rejection

log = logging.getLogger("moefuse.detect")


# Front ends for what the roles alone cannot pin down: Llama4's routing weights on the expert *input* of a dense
# bmm over every expert. Everything else is matched by `generic`.
_FORMS = [(input_weighted.find, input_weighted.match)]


def _candidates(graph: fx.Graph, claimed: set[fx.Node]):
    """(form, matched matmuls, a thunk building the Region) for every candidate: the front ends of one form
    first, then every block of expert products by the role of each dim (`generic`), which takes what the
    front ends could not."""
    for find, match in _FORMS:
        for form, anchor, mms in find(graph):
            yield form, mms, lambda anchor=anchor, mms=mms, match=match: match(anchor, mms)
    for ups, down in generic.find(graph, claimed):
        yield "expert roles", [u.node for u in ups] + [down.node], lambda ups=ups, down=down: generic.match(ups, down)
    for ids, experts, selecting in loops.find(graph, claimed):
        linears = [n for e in sorted(experts) for n in experts[e]]
        yield "per-expert loop", linears, lambda ids=ids, experts=experts, sel=selecting: loops.match(ids, experts, sel)


def detect(gm: fx.GraphModule) -> tuple[list[Region], list[Rejection]]:
    """Every MoE region of the graph, and every candidate that was not taken, with its reason. A candidate
    rejected by one front end and taken by a later one is not reported; one rejected twice is reported once,
    with the first (the more specific) reason."""
    regions, claimed = [], set()
    rejected: list[tuple[set[fx.Node], Rejection]] = []
    for form, mms, build in _candidates(gm.graph, claimed):
        if any(m in claimed for m in mms):
            continue
        try:
            region = build()
        except Reject as r:
            module = fu.module_path(mms[-1])
            log.info("rejected %s candidate at %s: %s", form, module, r)
            if not any(set(mms) & seen for seen, _ in rejected):
                rejected.append((set(mms), Rejection(r.reason, r.node, module, r.detail)))
            continue
        owned = {n for n in region.nodes if isinstance(fu.value(n), torch.Tensor)}  # sizes may be shared
        if claimed & owned:
            rejected.append((set(mms), Rejection(Reason.UNSUPPORTED_FORM, region.output.name, region.module,
                                                 "overlaps a region already taken")))
            continue
        claimed |= owned
        rejected = [(seen, rej) for seen, rej in rejected if not seen & owned]
        regions.append(region)
        log.info("found %s region at %s: %s", form, region.module, region.spec.describe())
    candidates = fu.descendants(set().union(*(seen for seen, _ in rejected))) if rejected else set()
    candidates |= {n for r in regions for n in (r.topk_ids, r.topk_weights)}  # routing a region consumes
    rejections = [rej for _, rej in rejected] + _unclaimed_routing(gm.graph, claimed, candidates)
    return regions, rejections


def _unclaimed_routing(graph: fx.Graph, claimed: set[fx.Node], candidates: set[fx.Node]) -> list[Rejection]:
    """A line for every top-k over experts that no region took and no candidate above reported, so no MoE-shaped
    code goes unmentioned. What its ids drive says why: a capacity mask (a cumsum of expert positions compared
    with a bound), the graph's output (the experts run after a graph break or in eager code: transformers'
    experts_implementation="eager"), a per-expert loop (ids == e), or something else moefuse does not know."""
    output = next(n for n in graph.nodes if n.op == "output")
    rejections = []
    for n in graph.nodes:
        if fu.op_name(n) not in ("torch.topk", "method:topk") or n in claimed:
            continue
        ids = [u for u in n.users if fu.op_name(u) == "getitem" and u.args[1] == 1]
        driven = fu.descendants(ids)
        if not ids or (driven | set(ids)) & candidates:
            continue  # a candidate region already says what happened to it
        if any(fu.op_name(m).startswith("moefuse::") for m in driven):
            continue  # the fused op moefuse.convert put in the graph consumes it
        module = fu.module_path(n)
        order = {m: i for i, m in enumerate(graph.nodes)}
        try:
            assemble._capacity(sorted(driven, key=order.__getitem__))
        except Reject as r:
            rejections.append(Rejection(r.reason, r.node, module, r.detail))
            continue
        reach = set(ids)
        for _ in range(4):
            reach |= {u for r in reach for u in r.users if fu.is_view(u) or fu.is_cast(u)}
        if output in {u for r in reach for u in r.users}:
            rejections.append(Rejection(Reason.EXPERTS_OUTSIDE_GRAPH, n.name, module,
                                        "the top-k ids are returned from this graph, to code after it"))
        elif sum(fu.op_name(m) in loops.EQ for m in driven) >= 2 and any(fu.op_name(m) in loops.SELECT for m in driven):
            rejections.append(Rejection(Reason.UNSUPPORTED_FORM, n.name, module,
                                        "a per-expert loop (ids == e, then where/nonzero) over experts held as "
                                        "separate modules is not lowered in the graph"))
        elif any(isinstance(fu.value(m), torch.Tensor) and fu.is_float(m) for m in driven):
            rejections.append(Rejection(Reason.UNSUPPORTED_FORM, n.name, module,
                                        f"top-k over {fu.shape(n.args[0])[-1]} drives computation that is not "
                                        "one MoE layer moefuse recognises (no expert weights [E, ·, ·] multiplied "
                                        "by rows routed with these ids)"))
    return rejections
