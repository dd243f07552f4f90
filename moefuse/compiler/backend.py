"""The moefuse torch.compile backend.

    import torch
    model = torch.compile(model, backend="moefuse")                    # registered as an entry point
    model = torch.compile(model, backend="moefuse", options={"inner": "eager"})
    print(moefuse.last_report())                                       # what the last compile did

Every MoE layer dynamo captured is replaced by one `moefuse::moe` call; the rest of the graph goes to the
inner compiler (Inductor by default). A layer that cannot be lowered exactly runs as it was, and the report
says why.
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.fx as fx

from moefuse.compiler.options import Options, parse_options
from moefuse.compiler.report import CompileReport, Explanation, Lowered
from moefuse.compiler.verify import check_runnable, verify
from moefuse.passes.canonicalize import canonicalize
from moefuse.passes.detect import detect
from moefuse.passes.region import Rejection, Reject
from moefuse.passes.rewrite import rewrite
from moefuse.passes.fxutil import module_path
from moefuse.runtime.op import kernels_for
from moefuse.spec import spec_from_key

log = logging.getLogger("moefuse")

_CONVERTED_NO_ROUNDING = ("moefuse.convert put the exact op here (it receives top-k routing, not the router's "
                         "scores); compile the unconverted model to round its tokens")

# The ops a graph may already hold (put there by moefuse.convert): inference, and training (with h).
_FUSED_OPS = (torch.ops.moefuse.moe.default, torch.ops.moefuse.moe, torch.ops.moefuse.moe_fwd.default,
              torch.ops.moefuse.moe_fwd)


def run_pipeline(gm: fx.GraphModule, options: Options, report: CompileReport) -> fx.GraphModule:
    """The pass pipeline. Order matters:
    canonicalize first, so each matcher sees one spelling per concept (no identity casts in the way);
    detect next, on the canonical graph, producing regions and typed rejections;
    verify each region before touching the graph, so a wrong detection is a rejection, never a wrong answer;
    rewrite last, one region at a time (regions are disjoint, so the order among them does not matter).
    """
    canonicalize(gm)
    for node in gm.graph.nodes:  # layers moefuse.convert / parallelize_experts already made ops, for the report
        if node.op == "call_function" and node.target in _FUSED_OPS:
            spec = spec_from_key(node.args[-1])
            device = node.args[0].meta["example_value"].device
            report.lowered.append(Lowered(module_path(node), node.name, spec, None, kernels_for(spec, device), True,
                                          training=node.target in _FUSED_OPS[2:],
                                          rounding_skipped=_CONVERTED_NO_ROUNDING if options.token_rounding != "off"
                                          else ""))
        elif node.op == "call_function" and str(node.target).startswith("moefuse.ep_moe"):
            report.lowered.append(_expert_parallel(node))
    regions, rejected = detect(gm)
    report.rejected.extend(rejected)
    for region in regions:
        error = None
        try:
            check_runnable(region)  # a spec the device's kernels refuse: rejected with verification off too
            error = verify(gm, region) if options.verify else None
        except Reject as r:
            report.rejected.append(Rejection(r.reason, r.node, region.module, r.detail))
            continue
        if not options.lower:
            report.lowered.append(Lowered(region.module, "(not rewritten: lower=False)", region.spec, error))
            continue
        device = region.x.meta["example_value"].device
        # Token rounding needs the router's full scores; where detection found none the layer stays exact.
        rounding = options.token_rounding if region.scores is not None else "off"
        skipped = region.scores_missing if options.token_rounding != "off" and rounding == "off" else ""
        node = rewrite(gm, region, rounding, options.tile_m)
        report.lowered.append(Lowered(region.module, node.name, region.spec, error, kernels_for(region.spec, device),
                                      training=region.needs_grad, rounding=rounding,
                                      tile_m=options.tile_m if rounding != "off" else None, rounding_skipped=skipped))
    return gm


def _expert_parallel(node: fx.Node) -> Lowered:
    """The report of a layer moefuse.parallelize_experts sharded: moefuse::ep_moe(x, ids, weights, w1, w2, b1,
    b2, spec, group_name, layer, save), w1 this rank's [E/W, N1, H] block."""
    import torch.distributed as dist

    spec = spec_from_key(node.args[7])
    group = dist.distributed_c10d._resolve_process_group(node.args[8])
    local = node.args[3].meta["example_value"].shape[0]
    first = dist.get_rank(group) * local
    kernels = kernels_for(spec, node.args[0].meta["example_value"].device)
    return Lowered(module_path(node), node.name, spec, None, kernels, training=bool(node.args[10]),
                   expert_parallel=(dist.get_world_size(group), first, first + local))


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


class Backend:
    """A moefuse backend instance: `torch.compile(model, backend=Backend(options))`. Keeps its reports."""

    def __init__(self, options: dict | Options | None = None):
        self.options = None if options is None else parse_options(options)
        self.explanation = Explanation()
        self._lock = threading.Lock()

    def __call__(self, gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
        opts = parse_options(options) if options is not None else (self.options or parse_options(None))
        if mode not in (None, "default"):
            log.warning("moefuse: mode=%r is passed on to nothing; the inner compiler runs its defaults "
                        "(set options={'inner': ...} to choose it)", mode)
        report = CompileReport(graph=f"{len(self.explanation.reports)}", inner=opts.inner)
        gm = run_pipeline(gm, opts, report)
        with self._lock:
            self.explanation.reports.append(report)
        log.info("%s", report)
        return _inner_compile(gm, example_inputs, opts.inner)

    # No `reset` method on purpose: torch._dynamo.reset() calls `backend.reset()`, and the reports must
    # outlive a reset (moefuse.explain resets dynamo after compiling).


# The instance behind `backend="moefuse"` (the torch_dynamo_backends entry point).
moefuse_backend = Backend()


def last_report() -> CompileReport | None:
    """The report of the most recent graph compiled with backend="moefuse"."""
    reports = moefuse_backend.explanation.reports
    return reports[-1] if reports else None


def reports() -> Explanation:
    """Every graph compiled with backend="moefuse" in this process."""
    return moefuse_backend.explanation
