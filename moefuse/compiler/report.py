"""What the backend did to each graph: regions lowered (with their spec), regions rejected (with a reason)."""
from __future__ import annotations

from dataclasses import dataclass, field

from moefuse.passes.region import Rejection
from moefuse.spec import MoESpec


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
