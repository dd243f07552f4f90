"""How dynamo captures MoE code for moefuse, and what the backend learns about the graph breaks that remain.

Data-dependent ops. Sort-based MoE dispatch counts tokens per expert (`bincount`, `nonzero`, `unique`, a
`.tolist()` of the counts). By default dynamo ends the graph at such an op, so the block spans two graphs and
cannot be fused. `enable_data_dependent_capture` turns on dynamo's `capture_dynamic_output_shape_ops` and
`capture_scalar_outputs`: the op's result becomes a tensor with an unbacked symbolic size (or an unbacked
symbolic int) inside the graph, and the whole block is one graph. This is what `fullgraph=True` already does
for the frame it compiles.

Why process-wide, from the moment a moefuse `Backend` is created (the registered one: when `torch.compile`
first looks up "moefuse"): dynamo would enter a backend's `backend_ctx_ctor` around every frame it traces,
which would scope the change to moefuse's frames, but `torch.compile` wraps every non-Inductor backend in
`torch._TorchCompileWrapper`, which does not forward that attribute (torch 2.11–2.13; only
`torch._dynamo.optimize(backend)` sees it). Nothing else of a backend runs before dynamo traces. So the
setting holds for every `torch.compile` in the process after moefuse is loaded, whatever its backend.
`MOEFUSE_CAPTURE_DATA_DEPENDENT=0` leaves dynamo's settings alone. Without it both are set on, whatever they
were: telling "False because the program chose it" from "False by default" is not reliable (dynamo's
`_is_default` turns False for good after any `config.patch` of the key exits, even when it restored the
default), and a choice that silently depended on import order would be worse than one switch.

The cost (README, "Graph breaks"): a `.tolist()` of, or a Python loop over, a tensor whose *length* is
data-dependent (`torch.bincount(ids, minlength=E).tolist()`) used to break the graph and now fails to trace
(GuardOnDataDependentSymNode, raised by dynamo before any backend runs); a static length
(`bincount(...)[:E]`, `histc`) fixes it. Tested in tests/test_graph_breaks.py, so a torch that lifts the
limitation shows up.

Graph breaks that remain. Dynamo records on each graph it hands over why it ended
(`gm.compile_subgraph_reason`: the reason and the user stack at the break). When that graph's top-k routing is
live at the break (a top-k result, or an integer tensor computed from the expert ids, is a graph output), the
MoE block spans the break: `split_rejections` reports it with the op, the source line and a hint.
"""
from __future__ import annotations

import logging
import os
import re

import torch
import torch.fx as fx

from moefuse.compiler.report import AfterGraphBreak, BreakKind, GraphBreak, SplitByGraphBreak
from moefuse.passes import fxutil as fu
from moefuse.passes.region import Reason, Rejection

log = logging.getLogger("moefuse")

ENV = "MOEFUSE_CAPTURE_DATA_DEPENDENT"
_SETTINGS = ("capture_dynamic_output_shape_ops", "capture_scalar_outputs")


def enable_data_dependent_capture() -> bool:
    """Turn on dynamo's capture of data-dependent ops (see the module docstring); True if they are on after.
    Reads MOEFUSE_CAPTURE_DATA_DEPENDENT when called ("0", "false", "no", "off": leave dynamo alone)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    config = torch._dynamo.config
    for name in _SETTINGS:
        setattr(config, name, True)
    return all(getattr(config, name) for name in _SETTINGS)


# --- graph breaks -------------------------------------------------------------------------------------------

_KINDS = (  # matched against dynamo's reason text, first match wins
    (BreakKind.DATA_DEPENDENT_SHAPE, r"capture_dynamic_output_shape_ops|[Dd]ynamic shape operator"),
    (BreakKind.SCALAR_OUTPUT, r"capture_scalar_outputs"),
    (BreakKind.EXPLICIT, r"graph_break\(\)"),
    (BreakKind.DATA_DEPENDENT_BRANCH, r"[Dd]ata[- ]dependent"),
    (BreakKind.UNSUPPORTED_CALL, r"builtin|[Uu]nsupported (function|method|call)|skip|[Aa]ttempted to call function"),
)


def graph_break_of(gm: fx.GraphModule) -> GraphBreak | None:
    """Why dynamo ended this graph, if it ended at a graph break (not at the frame's return)."""
    why = getattr(gm, "compile_subgraph_reason", None)
    if why is None or not getattr(why, "graph_break", False) or not getattr(why, "user_stack", None):
        return None
    text = str(why.reason)
    frame = why.user_stack[-1]
    kind = next((k for k, pattern in _KINDS if re.search(pattern, text)), BreakKind.OTHER)
    # The backend runs inside dynamo's trace, so the settings read here are the ones the break happened under:
    # with capture on, a data-dependent break has another cause (an op without a meta kernel), and the hint
    # "turn capture on" would be false.
    if (kind is BreakKind.DATA_DEPENDENT_SHAPE and torch._dynamo.config.capture_dynamic_output_shape_ops
            or kind is BreakKind.SCALAR_OUTPUT and torch._dynamo.config.capture_scalar_outputs):
        kind = BreakKind.OTHER
    context = re.search(r"Developer debug context:\s*(\S[^\n]*)", text)
    builtin = re.search(r"builtin (?:operator |function )?`(\w+)`", text)
    code = (frame.line or "").strip()
    op = builtin.group(1) if builtin else context.group(1).strip() if context else code
    return GraphBreak(kind, op, f"{os.path.basename(frame.filename)}:{frame.lineno}", code,
                      text.strip().splitlines()[0] if text.strip() else "graph break")


def _routing_live_at_end(gm: fx.GraphModule) -> list[fx.Node]:
    """The top-k nodes whose routing is a graph output: a top-k result itself (through views and casts), or an
    integer tensor computed from the expert ids (sorted order, counts, offsets). Hidden states computed by a
    finished MoE block depend on its top-k too, but are floating point: they do not count."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = {a for a in _flat(output.args) if isinstance(a, fx.Node)}
    live = []
    for n in gm.graph.nodes:
        if fu.op_name(n) not in ("torch.topk", "method:topk", "aten.topk") or not _scores_a_router(n):
            continue
        results = {u for u in n.users if fu.op_name(u) == "getitem"}
        near = set(results)
        for _ in range(4):
            near |= {u for r in near for u in r.users if fu.is_view(u) or fu.is_cast(u)}
        if near & outs:
            live.append(n)
            continue
        ids = [u for u in results if u.args[1] == 1]
        seen, todo = set(ids), list(ids)
        while todo:
            for u in todo.pop().users:
                if u not in seen and fu.is_int(u):
                    seen.add(u)
                    todo.append(u)
        if seen & outs:
            live.append(n)
    return live


_MAX_EXPERTS = 4096  # a top-k over more candidates is not expert routing (sampling over a vocabulary)
_SCORE_OPS = {"F.softmax", "torch.softmax", "method:softmax", "torch.sigmoid", "method:sigmoid", "F.sigmoid",
              "F.log_softmax", "method:log_softmax", "operator.add", "method:add", "operator.mul", "method:mul"}
_PROJECTIONS = {"F.linear", "torch.matmul", "method:matmul", "operator.matmul", "torch.mm", "method:mm",
                "torch.einsum", "torch.bmm"}


def _scores_a_router(topk: fx.Node) -> bool:
    """The top-k is expert routing: over at most a few thousand candidates, scoring a projection of the tokens
    (linear → softmax / sigmoid (+ bias) → topk), so a top-k elsewhere (sampling from logits) is not reported."""
    scores = topk.args[0] if topk.args else None
    t = fu.tensor(scores)
    # the candidates' count is a plain int for routing; a symbolic one (unbacked or dynamic) is not experts
    if t is None or t.dim() == 0 or not isinstance(t.shape[-1], int) or t.shape[-1] > _MAX_EXPERTS:
        return False
    node = scores
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return False
        name = fu.op_name(node)
        if name in _PROJECTIONS:
            return True
        if not (name in _SCORE_OPS or fu.is_cast(node) or fu.is_view(node)) or not node.args:
            return False
        node = node.args[0]
    return False


def _flat(args) -> list:
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        out.extend(_flat(a) if isinstance(a, (list, tuple)) else [a])
    return out


def split_rejections(gm: fx.GraphModule, rejected: list[Rejection]) -> list[Rejection]:
    """`rejected` with every MoE block that this graph's break splits reported as `SplitByGraphBreak`: detection's
    EXPERTS_OUTSIDE_GRAPH rejection of it is replaced (its hint is about eager expert loops, not about this break),
    and a block detection did not flag is added. Unchanged when the graph did not end at a break, or when no
    routing is live at the break (a break elsewhere in the model is not moefuse's to report)."""
    brk = graph_break_of(gm)
    if brk is None:
        return rejected
    live = _routing_live_at_end(gm)
    if not live:
        return rejected
    names = {n.name: n for n in live}
    out = []
    for r in rejected:
        if r.reason is Reason.EXPERTS_OUTSIDE_GRAPH and r.node in names:
            out.append(SplitByGraphBreak(r.reason, r.node, r.module, r.detail, graph_break=brk))
            names.pop(r.node)
        else:
            out.append(r)
    for name, n in names.items():
        out.append(SplitByGraphBreak(Reason.EXPERTS_OUTSIDE_GRAPH, name, fu.module_path(n), graph_break=brk))
    log.info("graph break inside an MoE block: %s", brk)
    return out


_RESUME = re.compile(r"torch_dynamo_resume_in_\w+_at_(\d+)$")


def resumed_from(gm: fx.GraphModule) -> str | None:
    """For a graph of the function dynamo resumes after a graph break: the break's "file:line"."""
    why = getattr(gm, "compile_subgraph_reason", None)
    for frame in getattr(why, "user_stack", None) or []:
        m = _RESUME.match(frame.name or "")
        if m:
            return f"{os.path.basename(frame.filename)}:{m.group(1)}"
    return None


def after_split(gm: fx.GraphModule, rejected: list[Rejection], splits: list[SplitByGraphBreak]) -> list[Rejection]:
    """`rejected` with the candidates of a graph that resumes after a split MoE block (`splits`: the blocks split
    so far) reported as `AfterGraphBreak`: what is left of the block is not a layer detection can take, and the
    fix is the break's. Only candidates of the same block: another layer in the resumed code keeps its own."""
    where = resumed_from(gm)
    split = [r for r in splits if where and r.graph_break.source == where]
    if not split:
        return rejected
    return [r if isinstance(r, (SplitByGraphBreak, AfterGraphBreak)) or not any(_same_block(s.module, r.module)
                                                                               for s in split)
            else AfterGraphBreak(r.reason, r.node, r.module, r.detail, graph_break=split[0].graph_break)
            for r in rejected]


def _same_block(router: str, candidate: str) -> bool:
    """Module paths (relative to one frame) of a split block's top-k and of a candidate in the resumed graph name
    the same block: they agree up to the top-k's parent (its block, when the top-k sits in a router submodule
    such as `mlp.gate`), and where they differ first it is not a layer index (`layers.0` vs `layers.1`)."""
    a = [] if router == "<top>" else router.split(".")
    b = [] if candidate == "<top>" else candidate.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == len(a):
        return True
    return common >= len(a) - 1 and not (common < len(b) and a[common].isdigit() and b[common].isdigit())
