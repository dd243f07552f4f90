"""MoESpec: the one contract between the passes that find an MoE layer and the kernels that run it.

It says everything the kernels need and nothing about FX. It is frozen and hashable (it keys the kernel
cache) and round-trips through a string (`to_key` / `from_key`), which is how it travels as an argument of
the `moefuse::moe` custom op. This module imports nothing else of moefuse.

Layout conventions (logical shapes; any strides are accepted by the runtime):
  x        [T, H]      tokens
  topk_ids [T, K]      int, expert of each (token, slot) pair
  topk_w   [T, K]      float, routing weight of each pair (applied to the expert *output*)
  w1       [E, N1, H]  up-projection, out × in (N1 = rows the activation reads, e.g. 2·I for a GLU)
  b1       [E, N1]     optional
  w3       [E, I, H]   with `MoESpec.w3` only: the GLU's up held apart from its gate (torchtitan, gpt-fast,
                       Mistral: w1 = gate, w3 = up). w1 is then [E, I, H] too, and the up-projection the
                       activation reads is the virtual [w1; w3] (N1 = 2·I rows), never materialised
  w2       [E, H, I]   down-projection, out × in
  b2       [E, H]      optional
  y        [T, H]      Σ_k topk_w[t,k] · expert_{ids[t,k]}(x[t])  (+ shared(x[t]) with a `SharedExpert`)

A shared expert (one dense MLP every token goes through, added to the routed output) is optional:
  shared_w1 [R1, H]    up-projection rows (R1 + R3 = SharedExpert.up_rows)
  shared_w3 [R3, H]    optional second up-projection (models that hold gate and up as two linears)
  shared_w2 [H, Is]    down-projection
  shared_gate [1, H]   optional: the output is scaled per token by sigmoid(x @ shared_gateᵀ) (Qwen2-MoE)
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Activation:
    """The expert's activation as an elementwise expression over slices of the up-projection output.

    `expr` is a sympy-parsable expression (see `moefuse.expr`) over the variables x0, x1, …; variable x_j
    reads, for output column n in [0, I), the up-projection row `slices[j][0] + slices[j][1] * n`.
    SwiGLU with weights stored [gate; up] is `silu(x0)*x1` with slices ((0, 1), (I, 1)); GPT-OSS's
    interleaved layout is slices ((0, 2), (1, 2)); a plain MLP `relu(x0)` has slices ((0, 1),).
    """

    expr: str
    slices: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not 1 <= len(self.slices) <= 2:
            raise ValueError(f"an activation reads 1 or 2 slices of the up-projection, got {len(self.slices)}")
        for off, step in self.slices:
            if off < 0 or step < 1:
                raise ValueError(f"bad slice (offset={off}, step={step}): offset >= 0 and step >= 1 required")

    @property
    def num_inputs(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class SharedExpert:
    """A dense MLP on every token whose output the layer adds to the routed experts' (DeepSeek-V3, Qwen2-MoE).

    `activation`'s slices index the up-projection rows [shared_w1; shared_w3] (`up_rows` of them): SwiGLU
    held as two linears gate, up is `x0*x1*sigmoid(x0)` with slices ((0, 1), (I, 1)). `gated`: the MLP's
    output is multiplied by sigmoid(x @ shared_gateᵀ), a per-token scalar.
    """

    intermediate: int
    up_rows: int
    activation: Activation
    gated: bool = False

    def __post_init__(self):
        if self.intermediate < 1 or self.up_rows < 1:
            raise ValueError(f"SharedExpert sizes must be >= 1, got I={self.intermediate} up_rows={self.up_rows}")
        last = max(off + step * (self.intermediate - 1) for off, step in self.activation.slices)
        if last >= self.up_rows:
            raise ValueError(f"shared activation slices {self.activation.slices} read row {last} of {self.up_rows}")

    def describe(self) -> str:
        return f"{'gated' if self.gated else 'ungated'}, I={self.intermediate}, act={self.activation.expr}"


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer, as the kernels see it. E experts, top-K routing, hidden H, expert width I."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    up_rows: int  # N1: rows of w1 per expert (2·I for a GLU stored [gate; up]; with w3, of the virtual [w1; w3])
    activation: Activation
    dtype: str  # dtype of x and the expert weights
    out_dtype: str  # dtype of y
    w1_bias: bool = False
    w2_bias: bool = False
    router: str = "unknown"  # how the routing was computed, for the report (the router stays in the graph)
    # The model scales the expert *input* by the routing weight (Llama4, top-1): the caller passes x already
    # scaled and unit weights, so the op computes the same; recorded for the report.
    weight_on_input: bool = False
    # Token rounding's tile height M (0: exact top-K). Each expert's pair count is a multiple of it, so the GEMMs
    # of the flat-pairs op use an M-tile that divides it and never compute a partial tile.
    tile_m: int = 0
    # The shared expert computed inside the op (added to the routed output), or None: it stays in the graph.
    shared: SharedExpert | None = None
    # The up-projection is two tensors, w1 [E, I, H] and w3 [E, I, H]: virtual row r < I is w1's row r, row I + r
    # is w3's row r (up_rows = 2·I); the activation reads the two halves, in either order. No copy [w1; w3]
    # exists anywhere (the weights change during training): the kernels read each tensor where it lies.
    w3: bool = False

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden", "intermediate", "up_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoESpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name in ("dtype", "out_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"MoESpec.{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
        last = max(off + step * (self.intermediate - 1) for off, step in self.activation.slices)
        if last >= self.up_rows:
            raise ValueError(
                f"activation slices {self.activation.slices} read row {last} of an up-projection "
                f"with {self.up_rows} rows"
            )
        if self.w3:
            I = self.intermediate  # noqa: E741
            if self.up_rows != 2 * I or self.activation.slices not in (((0, 1), (I, 1)), ((I, 1), (0, 1))):
                raise ValueError(
                    f"MoESpec.w3=True (gate and up as two tensors w1, w3 [E, I, H]) needs up_rows = 2·I = {2 * I} "
                    f"and activation slices ((0, 1), ({I}, 1)) or (({I}, 1), (0, 1)) (one input per tensor), got "
                    f"up_rows={self.up_rows} slices={self.activation.slices}"
                )
            if self.w1_bias:
                raise ValueError("MoESpec.w3=True with w1_bias=True: biases on a split up-projection (w1, w3) are "
                                 "not supported yet; hold gate and up as one [E, 2·I, H] tensor to use b1")

    @property
    def glu(self) -> bool:
        return self.activation.num_inputs == 2

    def to_key(self) -> str:
        """A canonical string; `MoESpec.from_key(spec.to_key()) == spec`."""
        d = dataclasses.asdict(self)
        for name in ("weight_on_input", "tile_m", "shared", "w3"):
            if not d[name]:  # keys of specs without it stay as they were (kernel caches, golden files)
                del d[name]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> MoESpec:
        d = json.loads(key)
        act = d.pop("activation")
        activation = Activation(act["expr"], tuple(tuple(s) for s in act["slices"]))
        shared = d.pop("shared", None)
        if shared is not None:
            sact = shared.pop("activation")
            sact = Activation(sact["expr"], tuple(tuple(s) for s in sact["slices"]))
            shared = SharedExpert(activation=sact, **shared)
        return cls(activation=activation, shared=shared, **d)

    def routed(self) -> MoESpec:
        """This spec without its shared expert: what the routed experts' kernels (and their caches) see."""
        return self if self.shared is None else dataclasses.replace(self, shared=None)

    def describe(self) -> str:
        bias = "+".join(n for n, b in (("b1", self.w1_bias), ("b2", self.w2_bias)) if b) or "no bias"
        return (
            f"E={self.num_experts} K={self.top_k} H={self.hidden} I={self.intermediate} {self.dtype} "
            f"act={self.activation.expr} slices={list(self.activation.slices)} {bias} router={self.router}"
            + (" gate/up as w1, w3" if self.w3 else "")
            + (" weights on input" if self.weight_on_input else "")
            + (f" token rounding M={self.tile_m}" if self.tile_m else "")
            + (f" shared expert: {self.shared.describe()}" if self.shared is not None else "")
        )


@functools.lru_cache(maxsize=None)
def spec_from_key(key: str) -> MoESpec:
    """`MoESpec.from_key`, parsed once per key: the ops receive the spec as its key on every call."""
    return MoESpec.from_key(key)
