"""What detection produces: a `Region` to lower, or a `Rejection` saying why not (typed, with a fix-it hint)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu
from moefuse.spec import MoESpec


class Reason(enum.Enum):
    """Why a candidate MoE region was left untouched. Each value carries the hint shown to the user."""

    UNSUPPORTED_FORM = "the expert matmuls are not in a form moefuse recognises yet"
    EXPERTS_OUTSIDE_GRAPH = ("top-k routing leaves the graph: the experts run in code dynamo did not capture (an eager "
                             "loop) or in a later graph (after a graph break)")
    NO_TOKENS = "could not find the token matrix the experts read"
    NO_ROUTING_IDS = "could not find the top-k expert ids that drive the dispatch"
    NO_ROUTING_WEIGHTS = "could not find the routing weights applied in the combine"
    NO_COMBINE = "could not find where the expert outputs are summed back per token"
    UNSUPPORTED_ACTIVATION = "the activation between the expert matmuls is not elementwise-liftable"
    UNSUPPORTED_OP = "the region contains an op whose semantics the fused op does not model"
    EXTERNAL_INPUT = "the region reads a value that is not tokens, routing, expert weights or biases"
    INTERIOR_ESCAPES = "an intermediate value of the region is used outside it"
    SHAPE = "shapes inside the region are inconsistent with one MoE layer"
    VERIFY_MISMATCH = "the fused op disagreed with the captured region on random inputs"
    VERIFY_ERROR = "running the captured region or the fused op on random inputs raised an error"
    INPUT_WEIGHTING = "the routing weights scale the expert input in a way one fused op cannot reproduce exactly"
    CAPACITY = "experts have a capacity: pairs routed past it are dropped, which exact top-k routing does not do"

    @property
    def hint(self) -> str:
        return _HINTS[self]


_HINTS = {
    Reason.UNSUPPORTED_FORM: "this layer runs unchanged; moefuse.explain(model, inputs) says whether "
                             "moefuse.convert(model) converts its module; else please file an issue with its code",
    Reason.EXPERTS_OUTSIDE_GRAPH: "a transformers model: load it with experts_implementation='grouped_mm'; any "
                                  "model: moefuse.explain(model, inputs) says whether moefuse.convert(model) "
                                  "converts this module",
    Reason.NO_TOKENS: "file an issue with the printed graph",
    Reason.NO_ROUTING_IDS: "file an issue with the printed graph",
    Reason.NO_ROUTING_WEIGHTS: "file an issue with the printed graph",
    Reason.NO_COMBINE: "file an issue with the printed graph",
    Reason.UNSUPPORTED_ACTIVATION: "express the activation with elementwise torch ops (see moefuse.passes.activation)",
    Reason.UNSUPPORTED_OP: "this layer runs unchanged; file an issue if it should be fused",
    Reason.EXTERNAL_INPUT: "this layer runs unchanged; file an issue if it should be fused",
    Reason.INTERIOR_ESCAPES: "do not return or reuse intermediate expert values outside the MoE block",
    Reason.SHAPE: "file an issue with the printed graph",
    Reason.VERIFY_MISMATCH: "this is a detection bug caught before it could change your results: please report it",
    Reason.VERIFY_ERROR: "set MOEFUSE_VERIFY=0 only if you know the region is correct; please report it",
    Reason.INPUT_WEIGHTING: "this layer runs unchanged; weights on the input lower exactly only with top-1 routing "
                            "and experts that map 0 to 0",
    Reason.CAPACITY: "this layer runs unchanged: dropping the pairs over capacity is part of its routing, and the "
                     "fused op computes every top-k pair",
}


@dataclass
class Rejection:
    reason: Reason
    node: str  # the FX node the problem was found at
    module: str  # module path of the MoE block, as far as known
    detail: str = ""
    # A hint checked against the model itself (`moefuse.explain` asks moefuse.convert whether it converts the
    # module), shown instead of the reason's generic one
    checked_hint: str = ""

    @property
    def hint(self) -> str:
        return self.checked_hint or self.reason.hint

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"[{self.reason.name}] {self.module} at node {self.node!r}: {self.reason.value}{detail} (hint: {self.hint})"


class Reject(Exception):
    """Raised inside a matcher; the pass turns it into a `Rejection`."""

    def __init__(self, reason: Reason, node: fx.Node | str, detail: str = ""):
        super().__init__(f"{reason.name}: {detail}")
        self.reason = reason
        self.node = node if isinstance(node, str) else node.name
        self.detail = detail


@dataclass
class SharedBranch:
    """The shared expert found beside a routed region: a dense MLP on x whose output is added to the routed
    output. `x` is the tokens as the MLP reads them: the region's x, or the [..., H] tensor that x is a
    view of (DeepSeek-V3 runs it on the [B, S, H] hidden states); the weights are graph parameters, as the
    op takes them (out × in)."""

    x: fx.Node
    w1: fx.Node  # [R1, H]
    w3: fx.Node | None  # [R3, H]: the second up-projection when gate and up are two linears
    w2: fx.Node  # [H, Is]
    gate: fx.Node | None  # [1, H]: the output is scaled by sigmoid(x @ gateᵀ)
    routed_output: fx.Node  # the routed experts' [T, H] output inside the region (the op's value before the add)

    @property
    def inputs(self) -> list[fx.Node]:
        return [n for n in (self.x, self.w1, self.w3, self.w2, self.gate) if n is not None]


@dataclass
class Region:
    """One MoE layer found in the graph, ready to be replaced by `moefuse::moe`.

    The op's arguments are graph values outside the region (`x`, `topk_ids`, `topk_weights`, the expert weight
    operands and biases); `output` is the region's only value used outside it.
    """

    spec: MoESpec
    module: str
    output: fx.Node
    nodes: list[fx.Node]  # every node the rewrite removes, in graph order (output last among users)
    x: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    w1: fx.Node  # as the graph holds it, see `w1_transposed`
    w2: fx.Node
    w1_transposed: bool  # the graph's operand is [E, in, out]: the op's w1 is its transpose
    w2_transposed: bool
    b1: fx.Node | None = None
    b2: fx.Node | None = None
    extra_inputs: list[fx.Node] = field(default_factory=list)  # symbolic sizes the region reads
    needs_grad: bool = False  # gradients flow through it: lower to the training op (saves H for backward)
    # The routing weights scale the expert *input* (Llama4): `topk_weights` is then the [T, E] score matrix,
    # zero off the top-1 (detection checked), and the op runs on x·s[t, id] with unit weights.
    weight_on_input: bool = False
    # The router's full score matrix [T, E] that top-k was taken over (token rounding ranks unselected tokens
    # by it and weights the pairs it adds with it); None when not found, with the reason in `scores_missing`.
    scores: fx.Node | None = None
    scores_missing: str = ""
    # The shared expert inside the region (`spec.shared` describes it; `output` is then the add of the routed
    # and shared outputs, possibly [..., H] rather than [T, H]); None when it is absent or left in the graph.
    shared: SharedBranch | None = None
    # Gate and up held as two weights (`spec.w3`): w1 gives the up-projection rows [0, I), w3 rows [I, 2I).
    w3: fx.Node | None = None
    w3_transposed: bool = False

    @property
    def per_expert(self) -> bool:
        """The experts are separate modules (a per-expert loop in the graph): w1, w2, w3 are lists of E 2-D
        parameters [out, in], stacked into the op's [E, out, in] operands on every call."""
        return isinstance(self.w1, list)

    @property
    def inputs(self) -> list[fx.Node]:
        """The values outside the region that it reads, in a fixed order (the probe's placeholders)."""
        nodes = [self.x, self.topk_ids, self.topk_weights, *fu.nodes_of(self.w1), *fu.nodes_of(self.w2), self.b1,
                 self.b2, *fu.nodes_of(self.w3)]
        shared = [n for n in self.shared.inputs if n is not self.x] if self.shared is not None else []
        return [n for n in nodes if n is not None] + self.extra_inputs + shared

    def op_operands(self, x, topk_ids, topk_weights):
        """The fused op's (x [T,H], topk_ids [T,K], topk_weights [T,K]) from the region's values of `x`,
        `topk_ids`, `topk_weights`: tensors (verification) or `fx.Proxy`s (the rewrite emits these ops into
        the graph, so autograd gives the router its gradient through them). Values the code holds in another
        shape ([B, S, H] tokens, [T·K] weights) are reshaped, tokens in another dtype cast to the experts'.
        With the weights on the input, Σ_e expert_e(x·s[t,e]) = expert_id(x·s[t,id]) since s is zero off the
        top-1 and expert(0) = 0."""
        spec = self.spec
        if fu.shape(self.x) != (fu.numel(self.x) // spec.hidden, spec.hidden):
            x = x.reshape(-1, spec.hidden)
        if not self.weight_on_input:
            if fu.shape(self.topk_ids) != (fu.numel(self.topk_ids) // spec.top_k, spec.top_k):
                topk_ids = topk_ids.reshape(-1, spec.top_k)
            if fu.shape(self.topk_weights) != (fu.numel(self.topk_weights) // spec.top_k, spec.top_k):
                topk_weights = topk_weights.reshape(-1, spec.top_k)
            return x, topk_ids, topk_weights
        s = topk_weights.gather(1, topk_ids)  # [T, 1]: the selected expert's score, as the graph computed it
        return x * s, topk_ids, torch.ones_like(s)

    def op_weights(self, w1, w2, w3=None):
        """The op's (w1 [E, N1, H] or with w3 [E, I, H], w2 [E, H, I], w3): the region's weights transposed
        where the graph holds them [E, in, out] and cast to the experts' compute dtype where the code casts
        them inside the layer (torchtitan computes its experts in bf16 whatever the parameters' dtype). Tensors
        or `fx.Proxy`s, as `op_operands`."""
        dtype = getattr(torch, self.spec.dtype)
        out = []
        for node, w, transposed in ((self.w1, w1, self.w1_transposed), (self.w2, w2, self.w2_transposed),
                                    (self.w3, w3, self.w3_transposed)):
            if node is None:
                out.append(None)
                continue
            if isinstance(node, list):  # one parameter per expert: stacked (a copy, on every call)
                w, node = torch.stack(list(w)), node[0]
            if transposed:
                w = w.transpose(-2, -1)
            if node.meta["example_value"].dtype != dtype:
                w = w.to(dtype)
            out.append(w)
        return tuple(out)

    def probe_weights(self, topk_ids, topk_weights):
        """What verification feeds the region as its `topk_weights` for random [T,K] weights: those weights, or
        with the weights on the input the [T, E] scores they are scattered into (zero off the top-k)."""
        if not self.weight_on_input:
            return topk_weights
        dense = topk_weights.new_zeros(topk_weights.shape[0], self.spec.num_experts)
        return dense.scatter(1, topk_ids.long(), topk_weights)
