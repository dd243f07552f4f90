"""What the backend did to each graph: regions lowered (with their spec), regions rejected (with a reason)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moefuse.passes.region import Rejection
from moefuse.spec import MoESpec


class BreakKind(enum.Enum):
    """Why dynamo ended a graph inside an MoE block (a graph break). Each value carries the hint shown to the user.

    Kept here, not in `passes.region.Reason`: a break is found by the backend from what dynamo records about the
    graph it hands over, not by detection."""

    DATA_DEPENDENT_SHAPE = "an op whose output shape depends on tensor data (bincount, nonzero, unique, …)"
    SCALAR_OUTPUT = "a tensor value read on the host (.item(), .tolist())"
    DATA_DEPENDENT_BRANCH = "Python control flow on a tensor's value"
    UNSUPPORTED_CALL = "a call dynamo cannot trace (print, logging, an unsupported builtin or library function)"
    EXPLICIT = "an explicit torch._dynamo.graph_break()"
    OTHER = "something dynamo cannot trace"

    @property
    def hint(self) -> str:
        return _BREAK_HINTS[self]


_CAPTURE_OFF = ("moefuse turns it on when a moefuse backend is created, unless MOEFUSE_CAPTURE_DATA_DEPENDENT=0 or "
                "the program set it itself: leave it on")
_BREAK_HINTS = {
    BreakKind.DATA_DEPENDENT_SHAPE: "dynamo's capture_dynamic_output_shape_ops was off here; " + _CAPTURE_OFF,
    BreakKind.SCALAR_OUTPUT: "dynamo's capture_scalar_outputs was off here; " + _CAPTURE_OFF,
    BreakKind.DATA_DEPENDENT_BRANCH: (
        "a Python loop or if over tensor data (e.g. `for e in experts_hit`, a loop over .tolist()) cannot be one "
        "graph: loop over range(num_experts), keep decisions on the device (torch.where, torch.cond, offsets from "
        "torch.cumsum), or use grouped_mm; for transformers models load with experts_implementation='grouped_mm', "
        "or call moefuse.convert(model) before compiling (it replaces the MoE blocks it recognises by their "
        "structure, transformers' eager expert loops among them)"),
    BreakKind.UNSUPPORTED_CALL: "a call made only for its side effect (print, logging) can be skipped while "
                                "compiling: `if not torch.compiler.is_compiling(): ...`; one that computes "
                                "something must be written with torch ops, or moved out of the MoE block's forward",
    BreakKind.EXPLICIT: "remove the torch._dynamo.graph_break() from the MoE block",
    BreakKind.OTHER: "rewrite the line so dynamo can trace it (dynamo's reason is quoted); moefuse.convert(model) "
                     "replaces, before compiling, the MoE blocks it recognises by their structure",
}


@dataclass(frozen=True)
class GraphBreak:
    """Where and why dynamo ended the graph it handed to the backend (from `gm.compile_subgraph_reason`)."""

    kind: BreakKind
    op: str  # what broke it: the ATen op or builtin dynamo names, else the source line's code
    source: str  # file:line of the user code at the break
    code: str  # that line's text
    dynamo_reason: str  # dynamo's own first line ("Dynamic shape operator", "Failed to trace builtin operator", …)

    def __post_init__(self):
        if len(self.dynamo_reason) > 160:
            object.__setattr__(self, "dynamo_reason", self.dynamo_reason[:157] + "...")

    def __str__(self) -> str:
        on = f"`{self.code}`" if self.op == self.code else f"{self.op!r} `{self.code}`"
        return f"{on} at {self.source} ({self.kind.value}; dynamo: {self.dynamo_reason})"


@dataclass
class SplitByGraphBreak(Rejection):
    """A MoE block that spans two graphs: its top-k routing is live at a graph break inside the block, so the
    experts run in the next graph and neither graph holds the whole layer. `reason` stays
    EXPERTS_OUTSIDE_GRAPH (what detection sees); the hint is the break's, which names what to change."""

    graph_break: GraphBreak | None = None

    def __str__(self) -> str:
        b = self.graph_break
        on = f"`{b.code}`" if b.op == b.code else f"{b.op!r} `{b.code}`"
        return (f"[{self.reason.name}] {self.module} at node {self.node!r}: the MoE block spans two graphs, split by "
                f"a graph break at {b.source} on {on}: {b.kind.value} (dynamo: {b.dynamo_reason}) "
                f"(hint: {b.kind.hint})")


@dataclass
class Lowered:
    module: str
    node: str  # the moefuse::moe node that replaced the region
    spec: MoESpec
    verify_error: float | None  # worst relative error of the verification probe; None when verify was off
    kernels: list[str] = field(default_factory=list)  # what will run it, per device kind
    by_convert: bool = False  # the graph already held the op: moefuse.convert put it there
    training: bool = False  # lowered to the training op: its fused backward runs too
    rounding: str = "off"  # token rounding applied to this layer ("up" / "down" / "nearest"): routing changed
    tile_m: int | None = None  # the tile rows counts were rounded to (with rounding on)
    rounding_skipped: str = ""  # token rounding was asked for but not applied here: why (the layer is exact)
    # moefuse::ep_moe (moefuse.parallelize_experts): (world, first, end), this rank runs experts [first, end)
    expert_parallel: tuple[int, int, int] | None = None
    # the experts are separate modules (a per-expert loop): their weights are stacked for the op on every call
    stacked_per_call: bool = False

    def __str__(self) -> str:
        check = ("by moefuse.parallelize_experts" if self.expert_parallel else
                 "by moefuse.convert" if self.by_convert else
                 "not verified" if self.verify_error is None else f"verified (rel. err {self.verify_error:.1e})")
        mode = " (training: fused forward + backward)" if self.training else ""
        lines = [f"  LOWERED  {self.module} → {self.node}{mode}: {self.spec.describe()} [{check}]"]
        if self.expert_parallel:
            world, first, end = self.expert_parallel
            lines.append(f"           expert parallel: world {world}, experts [{first}, {end}) local; tokens by "
                         "all-to-all, one row per token and rank (traffic: moefuse.parallel.stats)")
        if self.stacked_per_call:
            lines.append(f"           experts held as {self.spec.num_experts} separate modules (a per-expert loop): "
                         "their weights are stacked for the op on every call, a copy of every expert weight; "
                         "moefuse.convert(model) stacks them once instead")
        if self.rounding != "off":
            lines.append(f"           TOKEN ROUNDING {self.rounding!r} to multiples of M={self.tile_m}: routing changed, "
                         "outputs differ from exact top-K (meant for training; evaluate with token_rounding='off'); "
                         "runs moefuse.rounding.round_routing (torch ops, no host sync) → moefuse::moe_pairs")
        elif self.rounding_skipped:
            lines.append(f"           token rounding not applied, exact top-K: {self.rounding_skipped}")
        if self.spec.shared is not None and self.rounding != "off":
            lines.append(f"           shared expert: {self.spec.shared.describe()}, dense matmuls in the graph beside "
                         "moefuse::moe_pairs (no side stream with token rounding)")
        elif self.spec.shared is not None:
            lines.append(f"           shared expert: {self.spec.shared.describe()}, inside the op: dense matmuls on a "
                         "side stream (CUDA), overlapped with routing and the routed experts; after them on the CPU")
        lines += [f"           kernel: {k}" for k in self.kernels]
        return "\n".join(lines)


@dataclass
class AfterGraphBreak(Rejection):
    """A candidate in the graph that resumes after a `SplitByGraphBreak`: the second half of the split block
    (its routing arrives as graph inputs, so detection cannot see a whole layer). Reported with the split's
    break, which is what to fix; `reason` is detection's own."""

    graph_break: GraphBreak | None = None

    def __str__(self) -> str:
        b = self.graph_break
        detail = f": {self.detail}" if self.detail else ""
        return (f"[{self.reason.name}] {self.module} at node {self.node!r}: {self.reason.value}{detail}; this graph "
                f"resumes after the graph break at {b.source} that split an MoE block (hint: {b.kind.hint})")


@dataclass
class CompileReport:
    """One graph compiled by the backend."""

    graph: str
    lowered: list[Lowered] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    inner: str = "inductor"

    def __str__(self) -> str:
        head = f"graph {self.graph}: {len(self.lowered)} MoE layer(s) lowered, {len(self.rejected)} rejected; rest → {self.inner}"
        return "\n".join([head] + [str(r) for r in self.lowered] + [f"  REJECTED {r}" for r in self.rejected])


@dataclass
class Explanation:
    """Every graph compiled in one `moefuse.explain` call (or kept by a backend)."""

    reports: list[CompileReport] = field(default_factory=list)

    @property
    def lowered(self) -> list[Lowered]:
        return [r for rep in self.reports for r in rep.lowered]

    @property
    def rejected(self) -> list[Rejection]:
        return [r for rep in self.reports for r in rep.rejected]

    def __str__(self) -> str:
        if not self.reports:
            return "moefuse: no graph was compiled"
        total = f"moefuse: {len(self.lowered)} MoE layer(s) lowered, {len(self.rejected)} rejected, in {len(self.reports)} graph(s)"
        return "\n".join([total] + [str(r) for r in self.reports])
