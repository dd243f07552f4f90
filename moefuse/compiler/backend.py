"""The moefuse torch.compile backend.

    import torch
    model = torch.compile(model, backend="moefuse")                    # registered as an entry point
    model = torch.compile(model, backend="moefuse", options={"inner": "eager"})
    model = torch.compile(model, backend="moefuse", mode="max-autotune")      # mode → Inductor
    model = torch.compile(model, backend="moefuse", options={"token_rounding": "up", "epilogue_fusion": False})
    print(moefuse.last_report())                                       # what the last compile did

Every MoE layer dynamo captured is replaced by one `moefuse::moe` call; the rest of the graph goes to the
inner compiler (Inductor by default). A layer that cannot be lowered exactly runs as it was, and the report
says why; so does a layer that a graph break splits in two (`compiler/capture.py`).

`options` holds moefuse's own keys (`compiler/options.py`) and Inductor's (`torch._inductor.list_options()`);
the two sets do not overlap. Inductor's keys and `mode` go to Inductor exactly as `backend="inductor"` would
take them; with `inner="eager"` they have nothing to configure and are ignored with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import threading

import torch
import torch.fx as fx

from moefuse.compiler.capture import after_split, enable_data_dependent_capture, split_rejections
from moefuse.compiler.options import Options, parse_options
from moefuse.compiler.report import CompileReport, Explanation, Lowered, SplitByGraphBreak
from moefuse.compiler.verify import check_runnable, verify
from moefuse.errors import OptionsError
from moefuse.passes.canonicalize import canonicalize
from moefuse.passes.detect import detect
from moefuse.passes.region import Reason, Rejection, Reject
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
    try:
        canonicalize(gm)
        _report_ops_already_there(gm, options, report)
        regions, rejected = detect(gm)
    except Exception as e:  # noqa: BLE001 — a pass that cannot read a graph must not fail the user's compile
        # canonicalize only makes exact rewrites and detect only reads, so the graph is still what dynamo
        # captured, in meaning: it runs unchanged. (Graphs with unbacked sizes from data-dependent ops are new
        # ground for the passes, see compiler/capture.py.)
        first = (str(e).strip().splitlines() or [""])[0]
        log.warning("moefuse: detection failed on graph %s, which runs unchanged: %s: %s", report.graph,
                    type(e).__name__, first)
        regions, rejected = [], [Rejection(Reason.UNSUPPORTED_FORM, "<graph>", "<graph>",
                                           f"detection raised {type(e).__name__}: {first}")]
    # A block split by a graph break is reported with the op and line that split it, not as an eager loop.
    report.rejected.extend(split_rejections(gm, rejected))
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
                                      tile_m=options.tile_m if rounding != "off" else None, rounding_skipped=skipped,
                                      stacked_per_call=region.per_expert))
    return gm


def _report_ops_already_there(gm: fx.GraphModule, options: Options, report: CompileReport) -> None:
    """Layers moefuse.convert / parallelize_experts already made ops: reported as lowered."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUSED_OPS:
            spec = spec_from_key(node.args[-1])
            device = node.args[0].meta["example_value"].device
            report.lowered.append(Lowered(module_path(node), node.name, spec, None, kernels_for(spec, device), True,
                                          training=node.target in _FUSED_OPS[2:],
                                          rounding_skipped=_CONVERTED_NO_ROUNDING if options.token_rounding != "off"
                                          else ""))
        elif node.op == "call_function" and str(node.target).startswith("moefuse.ep_moe"):
            report.lowered.append(_expert_parallel(node))


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


_MOEFUSE_KEYS = frozenset(f.name for f in dataclasses.fields(Options))


def split_options(options: dict | Options | None) -> tuple[Options, dict]:
    """`options=` of torch.compile → (moefuse's Options, Inductor's keys). A key that is neither is an error
    naming both sets."""
    if options is None or isinstance(options, Options):
        return parse_options(options), {}
    if not isinstance(options, dict):
        raise OptionsError(f"options must be a dict or moefuse Options, got {type(options).__name__}")
    ours = {k: v for k, v in options.items() if k in _MOEFUSE_KEYS}
    theirs = {k: v for k, v in options.items() if k not in _MOEFUSE_KEYS}
    if theirs:
        import torch._inductor

        known = set(torch._inductor.list_options())
        unknown = sorted(k for k in theirs if k.replace("-", "_") not in known)
        if unknown:
            raise OptionsError(f"unknown moefuse option(s) {unknown}; valid options are "
                               f"{[f.name for f in dataclasses.fields(Options)]}, or any Inductor option "
                               "(torch._inductor.list_options())")
    return parse_options(ours), theirs


@dataclasses.dataclass(frozen=True)
class InnerCompiler:
    """What compiles the rest of the graph: `name` ("inductor" / "eager"), and for Inductor the `mode` and
    Inductor options given to torch.compile."""

    name: str
    mode: str | None = None
    options: tuple[tuple[str, object], ...] = ()


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: InnerCompiler):
    if inner.name == "eager":
        if inner.mode not in (None, "default") or inner.options:
            log.warning("moefuse: inner='eager' runs the rest of the graph as it is, so mode=%r and Inductor "
                        "option(s) %s do nothing (set options={'inner': 'inductor'} to use them)",
                        inner.mode, sorted(k for k, _ in inner.options))
        return gm.forward
    # torch's own Inductor entry: the same mode table, option validation and CUDA-graph set-up as
    # torch.compile(backend="inductor", mode=..., options=...).
    return torch._TorchCompileInductorWrapper(inner.mode, dict(inner.options) or None, None)(gm, example_inputs)


class Backend:
    """A moefuse backend instance: `torch.compile(model, backend=Backend(options))`. Keeps its reports.

        backend = moefuse.Backend({"inner": "eager"})
        torch.compile(model, backend=backend)(x)
        print(backend.explanation)

    It survives the ways programs pass backends around: `copy.copy` / `copy.deepcopy` give the backend itself
    (a compiler, like a function; Lightning Fabric deep-copies torch.compile's arguments and compiles again with
    the copy, and its reports must land where the caller reads them); pickling gives an independent backend with
    the same options and the reports so far (the registered `moefuse_backend` unpickles as the registered one
    of the receiving process); `functools.partial(backend, options={...})` sets options per call.
    """

    def __init__(self, options: dict | Options | None = None):
        # None: read the environment at each compile (the registered instance)
        self.options, self.inductor_options = (None, {}) if options is None else split_options(options)
        self.explanation = Explanation()
        # Dynamo must capture data-dependent ops before this backend sees any graph (compiler/capture.py).
        enable_data_dependent_capture()

    def __call__(self, gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
        if options is not None:
            opts, inductor = split_options(options)
        else:
            opts, inductor = self.options or parse_options(None), self.inductor_options
        report = CompileReport(graph=f"{len(self.explanation.reports)}", inner=opts.inner)
        gm = run_pipeline(gm, opts, report)
        with _REPORTS_LOCK:
            # The graph after a break that split an MoE block holds its second half: say so (dynamo compiles
            # the resumed function after the graph before it, so the split is known by then).
            splits = [r for rep in self.explanation.reports for r in rep.rejected if isinstance(r, SplitByGraphBreak)]
            report.rejected = after_split(gm, report.rejected, splits)
            self.explanation.reports.append(report)
        log.info("%s", report)
        return _inner_compile(gm, example_inputs, InnerCompiler(opts.inner, mode, tuple(inductor.items())))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        if self is globals().get("moefuse_backend"):
            return "moefuse_backend"  # pickle by name: the registered instance of the unpickling process
        return (_restore, (self.options, self.inductor_options, self.explanation))

    # No `reset` method on purpose: torch._dynamo.reset() calls `backend.reset()`, and the reports must
    # outlive a reset (moefuse.explain resets dynamo after compiling).


# One lock for every backend's report list: a backend holds no lock, so it pickles and deep-copies.
_REPORTS_LOCK = threading.Lock()


def _restore(options, inductor_options, explanation) -> Backend:
    backend = Backend.__new__(Backend)
    backend.options, backend.inductor_options, backend.explanation = options, inductor_options, explanation
    enable_data_dependent_capture()
    return backend


# The instance behind `backend="moefuse"` (the torch_dynamo_backends entry point).
moefuse_backend = Backend()


def last_report() -> CompileReport | None:
    """The report of the most recent graph compiled with backend="moefuse"."""
    reports = moefuse_backend.explanation.reports
    return reports[-1] if reports else None


def reports() -> Explanation:
    """Every graph compiled with backend="moefuse" in this process."""
    return moefuse_backend.explanation
