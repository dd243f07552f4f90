"""rewrite: replace one detected region by a single `moefuse::moe` call, then delete the region.

Inference regions become `moefuse::moe`; regions that gradients flow through become
`moefuse::moe_fwd(...)[0]`, whose registered autograd formula runs the fused backward. A region with its
shared expert inside (`region.shared`) passes the shared weights as the op's trailing arguments; when the
add was over [B, S, H] views of the tokens, the op's [T, H] result is viewed back the same way.
With token rounding on (and the router's scores found), the region becomes two calls instead:
`moefuse.rounding.round_routing(scores, topk_ids, topk_weights, mode, tile_m)` (plain torch ops, traced through
by AOTAutograd, so gradients reach the router) and `runtime.pairs.fused_moe_pairs` on the flat pairs it
returns (`moefuse::moe_pairs`, or its training op when gradients flow).

Postconditions (checked): the graph lints; the region's output has no users left; no node of the region
remains. The new node takes the output's place in graph order and its metadata (so later passes and
AOTAutograd see the same value); no value that existed before is aliased by the new node.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from moefuse.passes.region import Region
from moefuse.rounding import round_routing

# Importing the runtime registers torch.ops.moefuse.moe (inference) and moefuse.moe_fwd/moe_bwd (training).
from moefuse.runtime import autograd as _autograd  # noqa: F401
from moefuse.runtime import op as _op  # noqa: F401
from moefuse.runtime import pairs as _pairs  # moefuse::moe_pairs; fused_moe_pairs picks its op by grad mode
from moefuse.runtime import shared as _shared


def rewrite(gm: fx.GraphModule, region: Region, rounding: str = "off", tile_m: int = 128) -> fx.Node:
    """Replace `region` in `gm`; return the new op's node. `rounding` (a token-rounding mode other than "off")
    applies only when detection found the router's scores (`region.scores`); the caller reports which."""
    graph, out = gm.graph, region.output
    spec = region.spec
    order = {n: i for i, n in enumerate(graph.nodes)}
    operands = [region.x, region.topk_ids, region.topk_weights]
    # Before the output, unless the output is a buffer made before the routing and filled by the region's in-place
    # updates (a per-expert loop's `results = zeros_like(x)`): then after the region's last node.
    where = (graph.inserting_before(out) if max(order[n] for n in operands) < order[out]
             else graph.inserting_after(region.nodes[-1]))
    tracer = fx.proxy.GraphAppendingTracer(graph)  # one tracer, so ops may combine the proxies (torch.stack)

    def proxy(n):
        return fx.Proxy(n, tracer)

    with where:
        x, ids, weights = (p.node for p in region.op_operands(*(proxy(n) for n in (
            region.x, region.topk_ids, region.topk_weights))))
        if x is not region.x or str(region.x.meta["example_value"].dtype).removeprefix("torch.") != spec.dtype:
            x = graph.call_method("to", (x, getattr(torch, spec.dtype)))
        w1, w2, w3 = (None if p is None else p.node for p in region.op_weights(
            *(None if n is None else [proxy(m) for m in n] if isinstance(n, list) else proxy(n)
              for n in (region.w1, region.w2, region.w3))))
        sh = region.shared
        # the shared expert's weights ride along as the op's trailing arguments (its output is added inside)
        shared_args = (sh.w1, sh.w2, sh.gate, sh.w3) if sh is not None else ()
        if sh is not None and region.weight_on_input:  # the op's x is scaled for the routed experts only
            shared_args += (region.x,)
        args = (x, ids, weights, w1, w2, region.b1, region.b2, spec.to_key(), *shared_args)
        w3_kwargs = {"w3": w3} if w3 is not None else {}
        if rounding != "off" and region.scores is not None:
            pairs = graph.call_function(round_routing, (region.scores, ids, weights, rounding, tile_m))
            # tile_m: so the op's GEMM tiles divide the rounded counts; the flat-pairs op has no shared expert
            rounded = dataclasses.replace(spec.routed(), tile_m=tile_m)
            op_node = new = graph.call_function(_pairs.fused_moe_pairs,
                                                (rounded.to_key(), x, pairs, w1, w2, region.b1, region.b2), w3_kwargs)
            if sh is not None:  # so the shared expert's dense MLP is traced through, then added
                s_x = region.x if region.weight_on_input else x
                s_out = graph.call_function(_shared.shared_forward_for,
                                            (spec.to_key(), s_x, sh.w1, sh.w3, sh.w2, sh.gate))
                new = graph.call_function(operator.add, (new, s_out))
        elif region.needs_grad:
            # The training op returns (y, h): h, the pre-activation, is what its backward keeps.
            op_node = graph.call_function(torch.ops.moefuse.moe_fwd.default, args, w3_kwargs)
            new = graph.call_function(operator.getitem, (op_node, 0))
        else:
            op_node = new = graph.call_function(torch.ops.moefuse.moe.default, args, w3_kwargs)
    keep = ("example_value", "nn_module_stack", "stack_trace", "source_fn_stack", "val")
    # the op's value is the routed output's [T, H] (plus the shared expert's): its metadata
    value_of = region.shared.routed_output if region.shared is not None else out
    new.meta.update({k: v for k, v in value_of.meta.items() if k in keep})
    new.meta["moefuse_spec"] = spec
    if region.shared is not None and value_of.meta["example_value"].shape != out.meta["example_value"].shape:
        # the add was over [B, S, H] views of the tokens (DeepSeek-V3): the same view of the op's [T, H]
        with graph.inserting_after(new):
            new = graph.call_method("view_as", (new, region.shared.x))
        new.meta.update({k: v for k, v in out.meta.items() if k in keep})
    elif region.shared is None and out.meta["example_value"].dim() != 2:
        # the layer's output has the tokens' own [B, S, H] shape (detection checked): the op's [T, H] viewed so
        with graph.inserting_after(new):
            new = graph.call_method("view_as", (new, region.x))
        new.meta.update({k: v for k, v in out.meta.items() if k in keep})
    out.replace_all_uses_with(new)
    region_set = set(region.nodes)
    for node in reversed(region.nodes):
        if node.users and not isinstance(node.meta.get("example_value"), torch.Tensor):
            continue  # a symbolic size the rest of the graph also reads: it stays
        if node.users and all(u not in region_set for u in node.users) and node is not out:
            continue  # routing metadata the model also uses outside the layer (detection checked): it stays
        if node.users:
            raise AssertionError(f"moefuse rewrite: {node.name} still has users {list(node.users)} after rewrite")
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return op_node
