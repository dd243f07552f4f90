"""moefuse.convert: lower MoE layers that dynamo cannot capture, at module level.

transformers' `experts_implementation="eager"` runs the experts in a Python loop over the experts that were
hit (a data-dependent loop: dynamo breaks the graph there and no backend ever sees the experts). `convert`
gives such models the fused op directly, through transformers' own experts interface (no class is patched).
Experts transformers does not offer through that interface are swapped, module by module, for a
`FusedExperts` holding the stacked weights (built once) and calling the fused op; the router stays the
model's own code:
  - DBRX (`DbrxExperts`: 2-D `w1`/`v1`/`w2` of E·F rows),
  - Switch Transformers (`SwitchTransformersExperts`: a `ModuleDict` of MLPs, top-1 with a capacity limit;
    tokens over capacity become dropped pairs, id −1, so any capacity lowers exactly),
  - JetMoE (`JetMoeMoE`: per-expert stacked linears run by splitting the tokens with a host-synced
    `tolist()`; its top-k → softmax gating is re-done on the gate's own linear, without the sync),
  - a user's block, recognised by structure whatever its names (Mistral's `MoeLayer`, litgpt's `LLaMAMoE`,
    transformers 4.x Mixtral, DeepSeek-MoE): a router — an `nn.Linear(H, E)` or a weight [E, H] anywhere in
    the block — and an `nn.ModuleList` / `nn.ModuleDict` of E alike expert MLPs (Linear → act → Linear, or a
    GLU with gate/up Linears, biases or not), and optionally a shared expert (a child whose output on x the
    block adds). Top-k and the routing rule are not read from attributes: the
    block is run once with instrumented experts (expert e returns the unit vector e), which shows each
    token's weight for each expert however the block dispatches and combines; K and the rule (softmax or
    sigmoid scores, top-k, ± renormalising, times a constant) follow from that and the router's logits. The
    replacement keeps the block's router and is swapped in only after its output and gradients (input,
    router, every expert weight) match the block's on a probe; otherwise the block stays, with the reason;
  - an experts container with its own forward called as `experts(x, top_k_index, top_k_weights)` the way
    transformers' experts are (checked on a random probe too).

Weights: `FusedExperts` owns the stacked parameters `w1` [E, N1, H], `w2` [E, H, I] (and `b1`, `b2`). Where
the model already stores them so (JetMoE) they are the same `Parameter` objects, otherwise copies; the
original per-expert modules are removed from the model, so memory is not doubled, and `state_dict()` holds
the stacked keys (`...experts.w1`, …). Convert before creating an optimizer.

    summary = moefuse.convert(model)     # every experts module now calls moefuse::moe
    print(summary)
    compiled = torch.compile(model, backend="moefuse")   # the backend sees one moefuse::moe node per layer

The converted model also runs without compiling (the op's CPU path or its Triton kernels).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from moefuse.errors import ConversionError, InputError, MoefuseError
from moefuse.passes.assemble import capture_activation
from moefuse.passes.region import Reject
from moefuse.runtime.autograd import fused_moe
from moefuse.spec import Activation, MoESpec

log = logging.getLogger("moefuse.convert")

IMPLEMENTATION = "moefuse"  # the name registered in transformers' ExpertsInterface
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused op reads and writes
# A replacement matches its module on a probe when max |new − old| ≤ tol · max |old|: the fused op sums in
# another order and rounds at other points than the module's own code, by about the dtype's epsilon times a
# few (the numbers of the backend's own pre-rewrite check, `compiler.verify.TOLERANCE`).
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class ConvertSummary:
    converted: list[str] = field(default_factory=list)  # module paths now calling moefuse::moe
    skipped: dict[str, str] = field(default_factory=dict)  # module path → why it was left as it was

    def __str__(self) -> str:
        lines = [f"moefuse.convert: {len(self.converted)} experts module(s) converted, {len(self.skipped)} skipped"]
        lines += [f"  CONVERTED {m}" for m in self.converted]
        lines += [f"  SKIPPED   {m}: {why}" for m, why in self.skipped.items()]
        return "\n".join(lines)


def is_interface_experts(m: torch.nn.Module) -> bool:
    """A module built with transformers' `@use_experts_implementation` (3-D stacked expert weights)."""
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)


def expert_weights(m):
    if isinstance(m, FusedExperts):
        return m.w1, m.w2, m.b1, m.b2
    w1 = m.gate_up_proj if m.has_gate else m.up_proj
    b1 = (m.gate_up_proj_bias if m.has_gate else m.up_proj_bias) if m.has_bias else None
    b2 = m.down_proj_bias if m.has_bias else None
    w2 = m.down_proj
    if m.is_transposed:  # stored [E, in, out]: the op takes [E, out, in], a view, never a copy
        w1, w2 = w1.transpose(-2, -1), w2.transpose(-2, -1)
    return w1, w2, b1, b2


def why_not(m) -> str | None:
    if getattr(m, "has_post_expert_norm", False):
        return "a norm after each expert (has_post_expert_norm) is not part of the fused op yet"
    if getattr(m, "_is_expert_parallel", False):
        return "the experts are sharded for expert parallelism by transformers; moefuse's EP is separate"
    if not getattr(m, "is_concatenated", True) and m.has_gate and not hasattr(m, "_apply_gate"):
        return "an interleaved gate/up layout without an _apply_gate to read the activation from"
    return None


def activation_fn(m):
    return m._apply_gate if m.has_gate else m.act_fn


@torch.compiler.assume_constant_result
def spec_key(m, x_dtype: torch.dtype, top_k: int) -> str:
    """The layer's MoESpec as the op's string argument. Under dynamo this runs once at trace time and its
    result is a constant of the graph (building a spec is Python that dynamo need not trace)."""
    w1, w2, b1, b2 = expert_weights(m)
    if x_dtype not in _OP_DTYPES:
        raise InputError(f"the experts' input is in {x_dtype}; the fused op reads and writes "
                         f"{', '.join(str(d).removeprefix('torch.') for d in _OP_DTYPES)} (the experts' weights "
                         f"are in {w1.dtype}): cast the input, e.g. model(x.to({w1.dtype}))")
    spec = MoESpec(
        num_experts=w1.shape[0], top_k=top_k, hidden=w2.shape[1], intermediate=w2.shape[2],
        up_rows=w1.shape[1], activation=m._moefuse_activation, dtype=str(w1.dtype).removeprefix("torch."),
        out_dtype=str(x_dtype).removeprefix("torch."), w1_bias=b1 is not None, w2_bias=b2 is not None,
        router=getattr(m, "_moefuse_router", "transformers experts interface (via moefuse.convert)"),
    )
    return spec.to_key()


def moefuse_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface, served by moefuse::moe: (x[T,H], ids[T,K], weights[T,K]) → y[T,H]."""
    if not hasattr(self, "_moefuse_activation"):
        raise RuntimeError(
            f"{type(self).__name__} is set to experts_implementation='moefuse' but was not prepared: "
            "call moefuse.convert(model) instead of set_experts_implementation('moefuse')"
        )
    w1, w2, b1, b2 = expert_weights(self)
    spec = spec_key(self, hidden_states.dtype, top_k_index.shape[-1])
    return fused_moe(hidden_states.to(w1.dtype), top_k_index, top_k_weights, w1, w2, b1, b2, spec)


class FusedExperts(nn.Module):
    """E experts with stacked weights, run by the fused op: forward(x [T, H], ids [T, K] int, weights [T, K])
    → y [T, H] = Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]) in x's dtype; ids outside [0, E) are dropped.

    w1 [E, N1, H] and w2 [E, H, I] (out × in; N1 = 2·I for a GLU stored [gate; up]), b1 [E, N1] and b2 [E, H]
    optional, all in one dtype. A `Parameter` passed in is registered as it is (shared, no copy); a tensor is
    copied into a new `Parameter` trained iff `requires_grad` (the original experts' setting). `activation`
    is read from the model's own code (`capture_activation`).
    """

    def __init__(self, w1, w2, b1=None, b2=None, *, activation: Activation, router: str,
                 dropout: float = 0.0, requires_grad: bool = True):
        super().__init__()

        def param(t):
            if t is None or isinstance(t, nn.Parameter):
                return t
            return nn.Parameter(t.detach().clone().contiguous(), requires_grad=requires_grad)

        self.w1, self.w2, self.b1, self.b2 = param(w1), param(w2), param(b1), param(b2)
        self.num_experts = self.w1.shape[0]
        self._moefuse_activation = activation
        self._moefuse_router = router
        self.dropout = dropout  # the original experts' dropout: the fused op has none, so training refuses it

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            raise MoefuseError(
                f"these experts were converted from modules applying dropout p={self.dropout} in training; the "
                "fused op does not: set the model's dropout to 0 before moefuse.convert to train it converted"
            )
        spec = spec_key(self, x.dtype, top_k_index.shape[-1])
        return fused_moe(x.to(self.w1.dtype), top_k_index, top_k_weights, self.w1, self.w2, self.b1, self.b2, spec)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, w1={tuple(self.w1.shape)}, w2={tuple(self.w2.shape)}, " \
               f"act={self._moefuse_activation.expr}"


class _DbrxExperts(FusedExperts):
    """`DbrxExperts`' call: (hidden_states [B, S, H], ids [B·S, K], weights [B·S, K]) → [B, S, H]."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        h = hidden_states.shape[-1]
        y = super().forward(hidden_states.reshape(-1, h), top_k_index, top_k_weights)
        return y.view(hidden_states.shape[0], -1, h)


class _MaskRoutedExperts(FusedExperts):
    """`SwitchTransformersExperts`' call: (x [T, H], one-hot mask [T, 1, E], weights [T, 1]) → [T, H]. A token
    whose mask row is all zero (over capacity) is a dropped pair: id −1, output 0, as in the loop."""

    def forward(self, hidden_states, selected_experts, routing_weights):
        mask = selected_experts.reshape(hidden_states.shape[0], -1)
        ids = torch.where(mask.sum(-1) > 0, mask.argmax(-1), -1).unsqueeze(-1)
        return super().forward(hidden_states, ids, routing_weights.reshape(-1, 1))


class _JetMoeBlock(nn.Module):
    """`JetMoeMoE` with its experts fused: (x [B, S, H]) → [B, S, H]. Keeps the block's own gate linear and
    output bias; re-does its gating (logits in fp32 → top-k → softmax → x's dtype), which JetMoE computes
    together with a host-synced `tolist()` of expert sizes that would break every compiled graph."""

    def __init__(self, block, experts: FusedExperts):
        super().__init__()
        self.router, self.experts, self.bias = block.router, experts, block.bias
        self.top_k = block.router.top_k

    def forward(self, layer_input):
        b, s, h = layer_input.size()
        x = layer_input.reshape(-1, h)
        logits = self.router.layer(x).float()
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(x)
        return self.experts(x, top_k_indices, top_k_gates).view(b, s, h) + self.bias


# --------------------------------------------------------------------------------------------------------
# A user's MoE block, recognised by structure: a router (an `nn.Linear(H, E)` anywhere in the block, or a
# weight parameter [E, H] of its own) and an `nn.ModuleList` / `nn.ModuleDict` of E alike expert MLPs, whatever
# the names. Top-k and the routing rule are not read from attributes (a block may keep K in `self.args`, in a
# config, or in a literal): they are found by probing the block with instrumented experts, then the
# replacement is checked against the block, forward and gradients.
# --------------------------------------------------------------------------------------------------------

# How a block may turn its router's logits [T, E] (fp32 here) into (ids [T, K], weights [T, K]). The experts a
# token reaches are the top-k of the logits for each (softmax and sigmoid keep the order); the rules differ in
# the weights. A constant factor on the weights (a routed scaling factor) is found by the probe.
def _softmax_topk(logits, k):
    w, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return ids, w


def _softmax_topk_renorm(logits, k):
    ids, w = _softmax_topk(logits, k)
    return ids, w / w.sum(dim=-1, keepdim=True)


def _topk_softmax(logits, k):
    w, ids = logits.topk(k, dim=-1)
    return ids, torch.softmax(w, dim=-1)


def _sigmoid_topk(logits, k):
    w, ids = torch.sigmoid(logits).topk(k, dim=-1)
    return ids, w


def _sigmoid_topk_renorm(logits, k):
    ids, w = _sigmoid_topk(logits, k)
    return ids, w / w.sum(dim=-1, keepdim=True)


_RULES = {"softmax → top-k": _softmax_topk, "softmax → top-k → renormalise": _softmax_topk_renorm,
          "top-k → softmax": _topk_softmax, "sigmoid → top-k": _sigmoid_topk,
          "sigmoid → top-k → renormalise": _sigmoid_topk_renorm}
_PROBE_SHAPES = {2: (16,), 3: (2, 8)}  # input rank → leading dims of a probe x [..., H]: a block takes one or both


@dataclass(frozen=True)
class _Routing:
    """How a block routes, as its probe showed: K, the rule, a constant factor on the weights, whether the block
    also returns its router's logits (transformers 4.x Mixtral: (y, logits [T, E])), whether it computes
    otherwise in training (noise, dropout), and the shared expert it adds."""

    top_k: int
    rule: str
    scale: float = 1.0
    returns_logits: bool = False
    train_differs: bool = False  # the block computes otherwise in training: the replacement refuses to train
    shared: str | None = None  # the block's child whose output on x it adds to the routed experts' (a shared expert)


class _RoutedBlock(nn.Module):
    """A user's MoE block with its experts fused: (x [..., H]) → [..., H] (and the router's logits [T, E] where
    the block returned them). Calls the block's own router (Linear or weight), then its rule. Only inputs of
    the ranks on which it was checked against the block are taken."""

    def __init__(self, router: nn.Linear | nn.Parameter, experts: FusedExperts, routing: _Routing,
                 ranks: tuple[int, ...], source: str, shared: nn.Module | None = None):
        super().__init__()
        # the block's own shared expert, added as the block added it, under the block's name for it
        self.shared_name = None if shared is None else \
            (routing.shared if routing.shared not in ("router", "router_weight", "experts") else "shared")
        if shared is not None:
            self.add_module(self.shared_name, shared)
        if isinstance(router, nn.Linear):
            self.router, self.router_weight = router, None
        else:
            self.router, self.router_weight = None, router
        self.experts, self.routing, self.ranks, self.source = experts, routing, ranks, source
        self.rule, self.top_k = routing.rule, routing.top_k  # read by moefuse-convert's report

    def forward(self, x):
        if x.dim() not in self.ranks:
            raise MoefuseError(
                f"this {self.source} was converted for inputs of rank {' or '.join(map(str, self.ranks))}, the "
                f"only ones on which it matched the original block; got x of shape {tuple(x.shape)}: call it as "
                "the model did, or keep the block unconverted")
        if self.training and self.routing.train_differs:
            raise MoefuseError(
                f"this {self.source} computes otherwise in training than in eval (noise on its router's input, a "
                "dropout of its own: seen on a probe); its fused replacement computes the eval form only: set the "
                "block's training-only noise and dropout to 0 before moefuse.convert to train it converted")
        flat = x.reshape(-1, x.shape[-1])
        if self.router is not None:  # a router kept in another dtype than the experts (fp32 gate): cast as the block
            logits = self.router(flat.to(self.router.weight.dtype))
        else:
            logits = nn.functional.linear(flat.to(self.router_weight.dtype), self.router_weight)
        ids, w = _RULES[self.rule](logits.float(), self.top_k)
        if self.routing.scale != 1.0:
            w = w * self.routing.scale
        y = self.experts(flat, ids, w.to(flat.dtype)).reshape(x.shape)
        if self.shared_name is not None:
            y = y + getattr(self, self.shared_name)(x)
        return (y, logits) if self.routing.returns_logits else y

    def extra_repr(self) -> str:
        scale = f", scale={self.routing.scale:g}" if self.routing.scale != 1.0 else ""
        scale += ", eval form only" if self.routing.train_differs else ""
        return f"from={self.source}, rule={self.rule!r}, top_k={self.top_k}{scale}, ranks={self.ranks}"


def _expert_list(c: nn.Module) -> list[nn.Module]:
    return list(c) if isinstance(c, nn.ModuleList) else [c[k] for k in c]


def _user_block(m: nn.Module):
    """A builder for `m` when it looks like an MoE block (a plain ModuleList/ModuleDict of E ≥ 2 modules of one
    class, each holding Linears of its own, and a router of E outputs beside it reading one of their widths);
    None when it does not. The builder raises ValueError (the reason it is skipped) for a block that looks so
    but is not served."""
    lists = [(n, c) for n, c in m.named_children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))
             and type(c).forward is nn.Module.forward and len(c) >= 2
             and len({type(e) for e in _expert_list(c)}) == 1
             and sum(isinstance(ch, nn.Linear) for ch in _expert_list(c)[0].children()) >= 2]
    found = []
    for name, c in lists:
        e = len(c)
        widths = {ch.in_features for ch in _expert_list(c)[0].children() if isinstance(ch, nn.Linear)}
        routers = [(p, r) for p, r in m.named_modules() if isinstance(r, nn.Linear) and r.out_features == e
                   and r.in_features in widths and not (p == name or p.startswith(name + "."))]
        routers += [(p, w) for p, w in m.named_parameters() if w.dim() == 2 and w.shape[0] == e
                    and w.shape[1] in widths and not p.startswith(name + ".")
                    and not isinstance(m.get_submodule(p.rpartition(".")[0]), nn.Linear)]
        if routers:
            found.append((name, c, routers))
    if not found:
        return None

    def build():
        if len(found) > 1:
            raise ValueError(f"several expert lists with a router beside them ({', '.join(n for n, _, _ in found)}): "
                             "cannot tell which one the block routes to")
        name, c, routers = found[0]
        if len(routers) > 1:
            raise ValueError(f"several candidate routers of {len(c)} outputs ({', '.join(p for p, _ in routers)}): "
                             "cannot tell which one routes the tokens")
        router = routers[0][1]
        experts = _expert_list(c)
        source = f"{type(m).__name__} (router {routers[0][0]!r}, experts {name!r})"
        fused = _mlp_experts(experts, "", layout=(layout := {}))
        h = fused.w2.shape[1]
        reads = router.shape[-1] if isinstance(router, nn.Parameter) else router.in_features
        if reads != h:
            raise ValueError(f"the router {routers[0][0]!r} reads {reads} features, the experts {h}: not a router "
                             "of these experts")
        kept = {name, routers[0][0].partition(".")[0]}  # the expert list and the child holding the router
        routing, ranks = _probe_block(m, experts, router, fused.w1, kept)
        fused._moefuse_router = f"{source}: {routing.rule}, top-{routing.top_k} (probed) → moefuse.convert"
        shared = None if routing.shared is None else m.get_submodule(routing.shared)
        new = _RoutedBlock(router, fused, routing, ranks, type(m).__name__, shared)
        for rank in ranks:
            _check_forward_and_grads(m, new, router, layout, rank)
        return new
    return build


def _stacked_user_block(m: nn.Module):
    """A builder that says why for a block of user code holding its experts as stacked parameters [E, ·, ·]
    beside a router of E outputs (not a form known by name): it is reported, not converted."""
    if is_interface_experts(m):
        return None
    stacked: dict[int, list[str]] = {}
    for n, p in m.named_parameters(recurse=False):
        if p.dim() == 3:
            stacked.setdefault(p.shape[0], []).append(n)
    for e, names in stacked.items():
        if e < 2 or len(names) < 2:
            continue
        router = [p for p, r in m.named_modules() if isinstance(r, nn.Linear) and r.out_features == e]
        router += [n for n, p in m.named_parameters(recurse=False) if p.dim() == 2 and p.shape[0] == e]
        if router:
            def build(names=names, router=router[0]):
                raise ValueError(
                    f"experts held as stacked parameters ({', '.join(names)}) beside the router {router!r} in user "
                    "code: which is the gate, the up and the down projection (and the activation) is not readable "
                    "at module level; compile with backend='moefuse' instead, whose graph pass reads the experts' "
                    "products from the graph (moefuse.explain says whether it lowers them)")
            return build
    return None


def _probe_input(h: int, rank: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.randn(*_PROBE_SHAPES[rank], h, generator=torch.Generator().manual_seed(seed))
    return x.to(like.device, like.dtype)


def _probe_block(m: nn.Module, experts: list[nn.Module], router, like: torch.Tensor,
                 kept: set[str]) -> tuple[_Routing, tuple[int, ...]]:
    """(the block's routing, the input ranks it takes), found by running it with instrumented experts: expert e
    returns the unit vector e (in groups of H when E > H), so the block's output minus its output with every
    expert returning zero is each token's routing weight of each expert, however the block dispatches and
    combines; what the block outputs with every expert returning zero must be 0 or one of its children (not
    those in `kept`) applied to x: a shared expert. Probes are in the experts' dtype (`like`). Raises
    ValueError when the block does not run on any probe or routes in no known way."""
    was = m.training
    m.train(False)  # dropout, jitter noise
    found: dict[int, _Routing] = {}
    failures: list[str] = []
    try:
        with torch.no_grad():
            for rank in _PROBE_SHAPES:
                x = _probe_input(like.shape[-1], rank, like, seed=0)
                try:
                    weights, logits, returns_logits, base = _observe(m, experts, router, x)
                except _ProbeError as exc:
                    failures.append(str(exc))
                    continue
                routing = _infer_routing(weights, logits, returns_logits, x.dtype, _differs_in_training(m, experts, x))
                found[rank] = dataclasses.replace(routing, shared=_shared_term(m, kept, x, base))
    finally:
        m.train(was)
    if not found:
        raise ValueError(failures[0])
    if len(set(found.values())) > 1:
        raise ValueError(f"the block routes differently for inputs of ranks {sorted(found)} ({list(found.values())})")
    return next(iter(found.values())), tuple(sorted(found))


def _differs_in_training(m: nn.Module, experts: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether the block itself, its experts aside, computes otherwise in training on the probe x (transformers
    4.x Mixtral's jitter noise on the router's input, a dropout of the block's): the replacement computes the
    eval form only. The global RNG is left as it was."""
    def first(out):
        return out[0] if isinstance(out, tuple) else out

    want = first(m(x))
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
        m.train(True)
        for e in experts:  # the experts' own dropout is FusedExperts' to refuse
            e.train(False)
        try:
            got = first(m(x))
        finally:
            m.train(False)
    return not _matches(want, got)


def _shared_term(m: nn.Module, kept: set[str], x: torch.Tensor, base: torch.Tensor) -> str | None:
    """None when the block's output without its routed experts is 0; else the name of its child c (a shared
    expert) with c(x) = that output. Raises ValueError when it is neither."""
    if not bool(base.any()):
        return None
    for name, c in m.named_children():
        if name in kept or not any(True for _ in c.parameters()):
            continue
        try:
            out = c(x)
        except Exception:  # noqa: BLE001 - a child that does not take x is not a term on x
            continue
        if _matches(base, out):
            return name
    raise ValueError("the block adds a term beside its routed experts that is none of its children applied to its "
                     "input (a gated shared expert, a residual?): not reproduced at module level")


class _ProbeError(Exception):
    """The block does not run on this probe input (another rank, say): not a reason to skip it yet."""


def _observe(m: nn.Module, experts: list[nn.Module], router, x: torch.Tensor):
    """(weights [T, E] fp32, router logits [T, E] fp32, whether `m` returned (y, logits), its output with every
    expert returning zero) on the probe x."""
    e, h = len(experts), x.shape[-1]
    t = x.numel() // h
    logits: list[torch.Tensor] = []
    router_hook = None if isinstance(router, nn.Parameter) else \
        router.register_forward_hook(lambda mod, args, out: logits.append(out))

    def run(basis: torch.Tensor):
        hooks = [ex.register_forward_hook(lambda mod, args, out, r=basis[j]: torch.zeros_like(out) + r)
                 for j, ex in enumerate(experts)]
        logits.clear()
        try:
            out = m(x)
        except Exception as exc:  # noqa: BLE001 - a block that does not take this input: tried at another rank
            raise _ProbeError(f"calling it as block(x {list(x.shape)}) raised {type(exc).__name__}: {exc}") from exc
        finally:
            for hk in hooks:
                hk.remove()
        y = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise _ProbeError(f"block(x {list(x.shape)}) returned {_shape_of(out)}, not one tensor of x's shape")
        return out, y

    try:
        base_out, base = run(torch.zeros(e, h, dtype=x.dtype, device=x.device))
        weights = torch.zeros(t, e, dtype=torch.float32, device=x.device)
        for lo in range(0, e, h):  # one unit vector per expert, H experts at a time
            basis = torch.zeros(e, h, dtype=x.dtype, device=x.device)
            hi = min(e, lo + h)
            basis[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
            _, y = run(basis)
            weights[:, lo:hi] = (y.float() - base.float()).reshape(t, h)[:, :hi - lo]
    finally:
        if router_hook is not None:
            router_hook.remove()
    if isinstance(router, nn.Parameter):
        scores = nn.functional.linear(x.reshape(t, h).to(router.dtype), router)
    elif len(logits) != 1 or logits[0].numel() != t * e:
        raise ValueError(f"the router ran {len(logits)} times on one call of the block (once, on every token, "
                         "is the form convert serves)")
    else:
        scores = logits[0].reshape(t, e)
    returns_logits = isinstance(base_out, tuple)
    if returns_logits and (len(base_out) != 2 or not isinstance(base_out[1], torch.Tensor)
                           or base_out[1].shape != (t, e)):
        raise ValueError(f"the block returns {_shape_of(base_out)}: only y, or (y, router logits [T, E]), is "
                         "reproduced")
    return weights, scores.float(), returns_logits, base


def _shape_of(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, tuple):
        return "(" + ", ".join(_shape_of(o) for o in out) + ")"
    return type(out).__name__


def _infer_routing(weights: torch.Tensor, logits: torch.Tensor, returns_logits: bool, dtype: torch.dtype,
                   train_differs: bool) -> _Routing:
    """The rule of `_RULES` (times a constant) that gives each token the weights [T, E] observed (0: the
    expert was not reached) from its router's logits [T, E]."""
    reached = weights != 0
    counts = reached.sum(-1)
    k = int(counts.max())
    if k == 0:
        raise ValueError("no expert's output reaches the block's output on the probe")
    if not bool((counts == k).all()):
        raise ValueError(f"tokens reach between {int(counts.min())} and {k} experts on the probe: not a fixed "
                         "top-k (a capacity limit, a threshold?)")
    top = weights.abs().max()
    best = None
    for name, rule in _RULES.items():
        ids, w = rule(logits, k)
        dense = torch.zeros_like(weights).scatter(1, ids, w)
        if not torch.equal(dense != 0, reached):
            continue
        scale = float((weights * dense).sum() / (dense * dense).sum())
        if abs(scale - 1) <= 1e-3:
            scale = 1.0
        err = float((weights - scale * dense).abs().max() / top)
        if best is None or err < best[0]:
            best = (err, name, scale)
    if best is None:
        raise ValueError(f"the {k} experts each token reaches are not the top-{k} of its router's logits on the "
                         "probe (grouped or biased expert selection is not served at module level)")
    err, name, scale = best
    if err > _PROBE_TOLERANCE.get(dtype, _PROBE_TOLERANCE[torch.float32]):  # the block rounds to its dtype
        raise ValueError(f"the routing weights are none of {list(_RULES)} (times a constant) on the probe "
                         f"(closest: {name}, off by {err:.2g} of the largest weight)")
    return _Routing(k, name, round(scale, 6), returns_logits, train_differs)


def _check_forward_and_grads(old: nn.Module, new: _RoutedBlock, router, layout: dict, rank: int) -> None:
    """`new` computes `old`'s output and, for a random output gradient, its gradients of the input, the router
    and every expert weight (mapped to the stacked layout), at the probe tolerance of the weights' dtype.
    Raises ValueError naming what differs."""
    x = _probe_input(new.experts.w2.shape[1], rank, new.experts.w1, seed=1).requires_grad_()
    was = old.training
    old.train(False), new.train(False)  # the mode `convert` gives it is the block's, set when it is swapped in
    try:
        with torch.enable_grad():
            want, got = old(x), new(x)
    finally:
        old.train(was)
    want_y, got_y = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
    if not _matches(want_y, got_y):
        raise ValueError(f"its fused replacement's output differs on a probe x {list(x.shape)} "
                         f"(rule {new.rule}, top-{new.top_k}): the block computes more than routed experts")
    if isinstance(want, tuple) and not _matches(want[1].float(), got[1].float()):
        raise ValueError("the router logits it returns are not its router's on the probe")
    routers = [("the router", router)] if isinstance(router, nn.Parameter) else \
        [(f"the router's {n}", p) for n, p in router.named_parameters()]
    if new.shared_name is not None:
        routers += [(f"the shared expert's {n}", p) for n, p in new.get_submodule(new.shared_name).named_parameters()]
    routers = [(n, p) for n, p in routers if p.requires_grad]
    stacked = {n: getattr(new.experts, n) for n in layout if getattr(new.experts, n) is not None
               and getattr(new.experts, n).requires_grad}
    olds = list({id(p): p for n in stacked for ps in layout[n] for p in ps}.values())
    g = torch.randn(want_y.shape, generator=torch.Generator().manual_seed(2)).to(want_y.dtype)
    og = torch.autograd.grad(want_y, [x, *(p for _, p in routers), *olds], g, allow_unused=True)
    ng = torch.autograd.grad(got_y, [x, *(p for _, p in routers), *stacked.values()], g, allow_unused=True)
    nr = 1 + len(routers)

    def zero(grad, like):
        return torch.zeros_like(like) if grad is None else grad

    by_param = {id(p): zero(gr, p) for p, gr in zip(olds, og[nr:])}
    pairs = [("the input", og[0], ng[0])] + [(n, zero(a, p), zero(b, p))
                                             for (n, p), a, b in zip(routers, og[1:nr], ng[1:nr])]
    for (n, w), b in zip(stacked.items(), ng[nr:]):
        a = torch.stack([torch.cat([by_param[id(p)] for p in ps]) for ps in layout[n]])
        pairs.append((f"the experts' {n}", a, zero(b, w)))
    low = new.experts.w1.dtype  # every gradient went through the experts' dtype
    bad = [what for what, a, b in pairs if a is None or b is None or not _matches(a, b, low)]
    if bad:
        raise ValueError(f"its fused replacement's gradients of {', '.join(bad)} differ on a probe x "
                         f"{list(x.shape)} (the forward matches)")


def _matches(want, got, dtype: torch.dtype | None = None) -> bool:
    """`got` is `want` up to the probe tolerance of `dtype`, by default `want`'s (see `_PROBE_TOLERANCE`); an
    fp32 router's gradient that went through bf16 experts is compared at bf16's."""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    tol = _PROBE_TOLERANCE.get(dtype or want.dtype, _PROBE_TOLERANCE[torch.float32])
    return ((want.float() - got.float()).abs().max() <= tol * want.float().abs().max().clamp_min(1e-6)).item()


class _RowsOf(nn.Module):
    """Stands in for an expert's up-projection Linear while its activation is captured: returns that Linear's
    rows [start, stop) of the stacked up-projection output. Keeps `weight` for code that reads its dtype."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        super().__init__()
        self.weight, self.start, self.stop = linear.weight, start, stop

    def forward(self, up):
        if (self.start, self.stop) == (0, up.shape[-1]):  # the only up Linear: no slice for the reader to lift
            return up
        return up[..., self.start:self.stop]


class _Output(nn.Module):
    """Stands in for the down-projection Linear while the activation is captured: the activation itself."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, a):
        return a


def _mlp_experts(experts: list[nn.Module], router: str, cls=FusedExperts, layout: dict | None = None) -> FusedExperts:
    """Stack experts that are each an MLP — Linear(H→I) → act → Linear(I→H), or a GLU whose two H→I Linears
    (or one H→2I Linear) are combined by the activation — into a `FusedExperts`; the activation is captured
    from the first expert's own forward with its Linears replaced by readers of the stacked up-projection.
    `layout`, when given, receives the stacking: stacked name → per expert, the parameters concatenated into
    its slice. Raises `Reject` (or ValueError for a structure that is not such an MLP)."""
    first = experts[0]
    linears = [(n, c) for n, c in first.named_children() if isinstance(c, nn.Linear)]
    if len(linears) not in (2, 3) or any(type(e) is not type(first) for e in experts):
        raise ValueError("experts are not all one MLP class with 2 (MLP) or 3 (GLU) Linear children")
    _check_alike(experts, [n for n, _ in linears])
    down_name = _called_last(first, linears)
    ups = [n for n, _ in linears if n != down_name]
    h = first.get_submodule(down_name).out_features
    if {first.get_submodule(n).in_features for n in ups} != {h}:
        raise ValueError(f"the up-projection Linears {ups} do not all read the hidden size {h} the down-projection "
                         f"{down_name!r} writes")
    # the ups' rows, stacked in registration order: [gate; up] Linears of I rows each, or one Linear of 2·I rows
    # that the activation splits (xformers' w12), or a plain MLP's I rows; the activation read says which
    probe = copy.copy(first)  # shallow: the same parameters, its own child table
    probe._modules = dict(first._modules)
    rows = 0
    for n in ups:
        width = first.get_submodule(n).out_features
        probe._modules[n] = _RowsOf(first.get_submodule(n), rows, rows + width)
        rows += width
    probe._modules[down_name] = _Output(first.get_submodule(down_name))
    dropout = 0.0
    for n, c in first.named_children():
        if isinstance(c, nn.Dropout):
            dropout = max(dropout, c.p)
            probe._modules[n] = nn.Identity()
    probe.training = False
    activation = capture_activation(probe, rows)

    # stacked name → per expert, the parameters concatenated into its slice (the probe maps gradients so too)
    parts = {"w1": [[e.get_submodule(n).weight for n in ups] for e in experts],
             "w2": [[e.get_submodule(down_name).weight] for e in experts]}
    if first.get_submodule(ups[0]).bias is not None:
        parts["b1"] = [[e.get_submodule(n).bias for n in ups] for e in experts]
    if first.get_submodule(down_name).bias is not None:
        parts["b2"] = [[e.get_submodule(down_name).bias] for e in experts]
    if layout is not None:
        layout.update(parts)
    w1, w2, b1, b2 = (torch.stack([torch.cat(ps) for ps in parts[n]]) if n in parts else None
                      for n in ("w1", "w2", "b1", "b2"))
    trained = any(p.requires_grad for e in experts for p in e.parameters())
    return cls(w1, w2, b1, b2, activation=activation, router=router, dropout=dropout, requires_grad=trained)


def _check_alike(experts: list[nn.Module], names: list[str]) -> None:
    """Every expert's Linears `names` have expert 0's shapes, bias or no bias, dtype and device: the stacked
    weights hold one of each. Raises ValueError naming the first expert and Linear that differ."""
    first = experts[0]
    ref = first.get_submodule(names[0]).weight
    for j, e in enumerate(experts):
        for n in names:
            a, b = first.get_submodule(n), getattr(e, n, None)
            if not isinstance(b, nn.Linear):
                raise ValueError(f"expert {j} has no Linear {n!r} as expert 0 has: the experts are not alike")
            where = f"expert {j}'s {n!r}"
            if b.weight.shape != a.weight.shape:
                raise ValueError(f"{where} maps {b.in_features}→{b.out_features}, expert 0's maps "
                                 f"{a.in_features}→{a.out_features}: experts of unequal widths cannot be stacked")
            if (b.bias is None) != (a.bias is None):
                has = "has a bias" if b.bias is not None else "has no bias"
                raise ValueError(f"{where} {has}, expert 0's {'has one' if a.bias is not None else 'has none'}: "
                                 "the fused op takes a bias for every expert or for none")
            for t in (b.weight, b.bias):
                if t is None:
                    continue
                if t.dtype != ref.dtype:
                    raise ValueError(f"{where} is in {t.dtype}, expert 0's weights in {ref.dtype}: the stacked "
                                     "weights hold one dtype (cast the experts to one dtype first)")
                if t.device != ref.device:
                    raise ValueError(f"{where} is on {t.device}, expert 0's weights on {ref.device}: the "
                                     "stacked weights live on one device (move the experts to one device first)")


def _called_last(expert: nn.Module, linears: list[tuple[str, nn.Linear]]) -> str:
    """The name of the Linear an expert calls last (its down projection), found by running it once on zeros
    of each candidate input width (registration order does not say which Linear comes last)."""
    order: list[str] = []
    hooks = [c.register_forward_hook(lambda mod, args, out, n=n: order.append(n)) for n, c in linears]
    try:
        for width in sorted({c.in_features for _, c in linears}):
            order.clear()
            try:
                with torch.no_grad():
                    expert(torch.zeros(1, width, dtype=linears[0][1].weight.dtype,
                                       device=linears[0][1].weight.device))
            except RuntimeError:  # a shape mismatch: the expert does not take this width
                continue
            if len(order) == len(linears):
                return order[-1]
    finally:
        for h in hooks:
            h.remove()
    raise ValueError("could not run the expert once with each of its Linears called exactly once")


def _glu_of(act, width: int):
    """act(gate) · up over [gate; up] rows (DBRX's and JetMoE's experts), `act` being the model's own module."""
    return lambda up: act(up[..., :width]) * up[..., width:]


def _module_form(m: nn.Module):
    """(what to replace, builder) for an MoE module form `convert` handles at module level; None otherwise."""
    name = type(m).__name__
    if name == "DbrxExperts" and hasattr(m, "mlp"):
        def build():
            e, f, h = m.num_experts, m.ffn_hidden_size, m.hidden_size
            w1 = torch.cat([m.mlp.w1.view(e, f, h), m.mlp.v1.view(e, f, h)], dim=1)  # [E, 2F, H]: [gate; up]
            act = capture_activation(_glu_of(m.mlp.activation_fn, f), 2 * f)
            new = _DbrxExperts(w1, m.mlp.w2.view(e, f, h).transpose(1, 2), activation=act,
                               router="DBRX router (model code) → moefuse.convert",
                               requires_grad=any(p.requires_grad for p in m.parameters()))
            _check_same_call(m, new)
            return new
        return build
    if name == "SwitchTransformersExperts":
        def build():
            new = _mlp_experts([m[k] for k in m], "Switch top-1 router with capacity (model code) → moefuse.convert",
                               _MaskRoutedExperts)
            _check_mask_call(m, new)
            return new
        return build
    if name == "JetMoeMoE":
        def build():
            w1, w2 = m.input_linear.weight, m.output_linear.weight  # already [E, 2I, H] and [E, H, I]
            act = capture_activation(_glu_of(m.activation, w2.shape[-1]), w1.shape[1])
            new = _JetMoeBlock(m, FusedExperts(w1, w2, activation=act, router="JetMoE top-k gating "
                                               "→ moefuse.convert"))
            _check_block(m, new, w1)
            return new
        return build
    block = _user_block(m) or _stacked_user_block(m)
    if block is not None:
        return block
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and type(m).forward is not nn.Module.forward:
        experts = list(m) if isinstance(m, nn.ModuleList) else [m[k] for k in m]
        if len(experts) >= 2 and all(isinstance(e, nn.Module) for e in experts):
            def build():
                fused = _mlp_experts(experts, f"{type(m).__name__}(x, ids, weights) (model code) → moefuse.convert")
                _check_same_call(m, fused)
                return fused
            return build
    return None


def _probe_routing(w: torch.Tensor, tokens: int = 7):
    """Random (x [T, H], ids [T, K], weights [T, K]) for the experts whose stacked up-projection is `w`."""
    h, e = w.shape[-1], w.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, h, generator=gen).to(w.device, w.dtype)
    ids = torch.argsort(torch.rand(tokens, e, generator=gen), dim=1)[:, :2] if e > 2 else \
        torch.zeros(tokens, 1, dtype=torch.long)
    return x, ids.to(w.device), torch.rand(ids.shape, generator=gen).to(w.device, w.dtype)


def _check_same(old: nn.Module, new: nn.Module, args: tuple, call: str) -> None:
    """`new(*args)` computes what `old(*args)` does (a random probe, at the weights' dtype's tolerance): a
    replacement that would change the model is a skip, not a change. Raises ValueError saying which."""
    was_old, was_new = old.training, new.training
    old.train(False), new.train(False)  # the model's own dropout would make any comparison fail
    try:
        with torch.no_grad():
            try:
                want = old(*args)
            except Exception as exc:  # noqa: BLE001 - any other call signature
                raise ValueError(f"calling it as {call} raised {type(exc).__name__}: {exc}") from exc
            got = new(*args)
    finally:
        old.train(was_old), new.train(was_new)
    if not _matches(want, got):
        raise ValueError(f"{call} does not compute Σ_k weights·expert_ids(x) on a random probe: its fused "
                         "replacement would change the model")


def _check_same_call(old: nn.Module, new: FusedExperts) -> None:
    """Experts called as (x [T, H], ids [T, K], weights [T, K]) → [T, H] (a user's experts container is only
    assumed to be; DBRX's are): checked on random routing before swapping."""
    _check_same(old, new, _probe_routing(new.w1), "experts(x, ids, weights)")


def _check_mask_call(old: nn.Module, new: FusedExperts) -> None:
    """Switch's experts, called with a one-hot expert mask [T, 1, E] (a zero row: a token over capacity) and
    weights [T, 1]."""
    x, ids, weights = _probe_routing(new.w1)
    mask = torch.nn.functional.one_hot(ids[:, :1], new.w1.shape[0])
    mask[3] = 0
    _check_same(old, new, (x, mask, weights[:, :1]), "experts(x, expert_mask, weights)")


def _check_block(old: nn.Module, new: nn.Module, w: torch.Tensor) -> None:
    """A whole MoE block, x [B, S, H] → [B, S, H] (JetMoE's: its gating is re-done by the replacement)."""
    x, _, _ = _probe_routing(w, tokens=10)
    _check_same(old, new, (x.view(2, 5, -1),), "block(x)")


def _register_with_transformers() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION, moefuse_experts_forward)


def convert(model: torch.nn.Module) -> ConvertSummary:
    """Make every MoE experts module of `model` call `moefuse::moe`; return what was changed and what not.

    transformers models (experts built with `@use_experts_implementation`, whatever experts implementation
    they were loaded with) switch to transformers' experts interface entry "moefuse"; each module's
    activation is read once, from the graph dynamo captures of its own gate function. The module-level
    forms (DBRX, Switch, JetMoE, experts containers; see the module docstring) are replaced by `FusedExperts`.
    A module moefuse cannot serve exactly keeps its implementation and is listed with the reason.

    All or nothing per call: every candidate is examined, each replacement built and checked first, and
    only then is the model changed. An exception raised on the way (a bug) leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"moefuse.convert takes a torch.nn.Module, got {type(model).__name__}",
                              "pass the model itself (not its state_dict, a path or a compiled wrapper's output)")
    summary = ConvertSummary()
    with torch.random.fork_rng(devices=[]):  # probes and dynamo's captures leave the user's CPU RNG as it was
        swaps = _plan_modules(model, summary)
        prepared = _plan_interface_experts(model, summary)
    # Commit: nothing above changed the model; nothing below can fail on a model's contents.
    for name, new, training in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.train(training))
        summary.converted.append(name)
    if prepared:
        _register_with_transformers()
        for name, m, activation in prepared:
            m._moefuse_activation = activation
            summary.converted.append(name)
        model.set_experts_implementation(IMPLEMENTATION)
    if summary.converted:
        log.info("%s", summary)
    return summary


def plan(model: torch.nn.Module) -> ConvertSummary:
    """What `convert(model)` would convert and skip, with every replacement built and checked on its probe, but
    the model left as it is (`moefuse.explain` uses it so that a hint naming convert is true)."""
    summary = ConvertSummary()
    with torch.random.fork_rng(devices=[]):
        swaps = _plan_modules(model, summary)
        prepared = _plan_interface_experts(model, summary)
    summary.converted += [name for name, _, _ in swaps] + [name for name, _, _ in prepared]
    return summary


def _why(exc: Exception) -> str:
    """The reason a module is skipped, from what building its replacement raised."""
    if isinstance(exc, Reject):
        return f"{exc.reason.value}: {exc.detail}"
    if isinstance(exc, TorchDynamoException):  # the activation is read from the graph dynamo captures of it
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"dynamo cannot capture the experts' activation in one graph ({type(exc).__name__}: {said})"
    return str(exc)


def _plan_modules(model: nn.Module, summary: ConvertSummary) -> list[tuple[str, nn.Module, bool]]:
    """(path, replacement, training flag) for each module-level MoE form (DBRX, Switch, JetMoE, experts
    containers) that converts; the others go to `summary.skipped` with why. The model is not changed."""
    swaps: list[tuple[str, nn.Module, bool]] = []
    for name, m in list(model.named_modules()):
        if any(name.startswith(done + ".") for done, _, _ in swaps):
            continue  # inside a module being replaced: goes with it
        build = _module_form(m)
        if build is None:
            continue
        if not name:
            summary.skipped[f"{type(m).__name__} (the model itself)"] = (
                "an MoE block passed as the model has no parent to swap its replacement into: convert the model "
                "that holds it")
            continue
        try:
            with torch.no_grad():
                new = build()
        except (Reject, ValueError, TorchDynamoException) as exc:
            summary.skipped[name] = _why(exc)
            continue
        swaps.append((name, new, m.training))
    return swaps


def _plan_interface_experts(model: nn.Module, summary: ConvertSummary):
    """Experts built with transformers' `@use_experts_implementation`: [(path, module, activation)] to switch
    to the interface entry "moefuse", or [] (with every one in `summary.skipped`) when any cannot be."""
    experts = [(name, m) for name, m in model.named_modules() if is_interface_experts(m)]
    prepared, failed = [], []
    for name, m in experts:
        why = why_not(m)
        if why is None:
            w1 = m.gate_up_proj if m.has_gate else m.up_proj
            rows = w1.shape[2] if m.is_transposed else w1.shape[1]
            try:
                prepared.append((name, m, capture_activation(activation_fn(m), rows)))
                continue
            except (Reject, TorchDynamoException) as exc:
                why = _why(exc)
        summary.skipped[name] = why
        failed.append(name)
    if prepared and failed:
        # transformers sets one implementation per config; mixing needs per-module configs, not done yet
        for name, _, _ in prepared:
            summary.skipped[name] = (f"left unconverted: other experts modules of this model cannot be converted "
                                     f"({failed[0]}: {summary.skipped[failed[0]]})")
        return []
    return prepared
