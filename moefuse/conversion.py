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
  - a user's block holding a router `nn.Linear(H, E)`, an `nn.ModuleList` / `nn.ModuleDict` of E expert
    MLPs (Linear → act → Linear, or a GLU with gate/up Linears) and a `top_k` attribute, looping over the
    experts in Python. Its router Linear is kept; how the block turns logits into weights is not readable
    from Python, so convert keeps the one of a few common rules (softmax → top-k, with or without
    renormalising; top-k → softmax) that reproduces the block on a random probe, and skips it otherwise;
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


# How a user's block may turn its router's logits [T, E] into (ids [T, K], weights [T, K]). Python code does
# not say which one a block uses: `convert` keeps the rule that reproduces the block on a random probe.
def _softmax_topk(logits, k, dtype):
    w, ids = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
    return ids, w.to(dtype)


def _softmax_topk_renorm(logits, k, dtype):
    w, ids = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
    return ids, (w / w.sum(dim=-1, keepdim=True)).to(dtype)


def _topk_softmax(logits, k, dtype):
    w, ids = logits.topk(k, dim=-1)
    return ids, torch.softmax(w, dim=-1, dtype=torch.float32).to(dtype)


_RULES = {"softmax → top-k": _softmax_topk, "softmax → top-k → renormalise": _softmax_topk_renorm,
          "top-k → softmax": _topk_softmax}
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected")


class _RoutedBlock(nn.Module):
    """A user's MoE block (a router `nn.Linear` and an `nn.ModuleList` of expert MLPs, looped over in Python)
    with its experts fused: (x [..., H]) → [..., H]. Calls the block's own router Linear, then its rule."""

    def __init__(self, router: nn.Linear, experts: FusedExperts, rule: str, top_k: int):
        super().__init__()
        self.router, self.experts, self.rule, self.top_k = router, experts, rule, top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = _RULES[self.rule](self.router(flat), self.top_k, flat.dtype)
        return self.experts(flat, ids, weights).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, top_k={self.top_k}"


def _user_block(m: nn.Module):
    """A builder for a block holding one router `nn.Linear(H, E)`, a plain `nn.ModuleList`/`nn.ModuleDict` of
    E ≥ 2 experts and an int top-k attribute; None when `m` is not such a block."""
    containers = [c for c in m.children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))
                  and type(c).forward is nn.Module.forward and len(c) >= 2]
    if len(containers) != 1:
        return None
    experts = list(containers[0]) if isinstance(containers[0], nn.ModuleList) else [containers[0][k] for k in containers[0]]
    routers = [c for c in m.children() if isinstance(c, nn.Linear) and c.out_features == len(experts)]
    k = next((getattr(m, a) for a in _TOP_K_NAMES if isinstance(getattr(m, a, None), int)), None)
    if len(routers) != 1 or k is None or not 1 <= k <= len(experts):
        return None

    def build():
        fused = _mlp_experts(experts, "")
        new = None
        for rule in _RULES:
            fused._moefuse_router = f"{type(m).__name__}'s router Linear → {rule} (probed) → moefuse.convert"
            candidate = _RoutedBlock(routers[0], fused, rule, k)
            if _same_on_probe(m, candidate, routers[0]):
                new = candidate
                break
        if new is None:
            raise ValueError(f"{type(m).__name__}'s routing is none of {list(_RULES)} on a random probe (or the "
                             "block computes more than routed experts): left as it is")
        return new
    return build


def _same_on_probe(old: nn.Module, new: nn.Module, router: nn.Linear) -> bool:
    w = router.weight
    x = torch.randn(2, 5, router.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    was = old.training
    old.train(False)
    try:
        with torch.no_grad():
            want, got = old(x), new(x)
    except Exception:  # noqa: BLE001 - a block that does not take [B, S, H] is not this form
        return False
    finally:
        old.train(was)
    return _matches(want, got)


def _matches(want, got) -> bool:
    """`got` is `want` up to the probe tolerance of `want`'s dtype (see `_PROBE_TOLERANCE`)."""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    tol = _PROBE_TOLERANCE.get(want.dtype, _PROBE_TOLERANCE[torch.float32])
    return ((want.float() - got.float()).abs().max() <= tol * want.float().abs().max().clamp_min(1e-6)).item()


class _RowsOf(nn.Module):
    """Stands in for an expert's up-projection Linear while its activation is captured: returns that Linear's
    rows [start, stop) of the stacked up-projection output. Keeps `weight` for code that reads its dtype."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        super().__init__()
        self.weight, self.start, self.stop = linear.weight, start, stop

    def forward(self, up):
        return up[..., self.start:self.stop]


class _Output(nn.Module):
    """Stands in for the down-projection Linear while the activation is captured: the activation itself."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, a):
        return a


def _mlp_experts(experts: list[nn.Module], router: str, cls=FusedExperts) -> FusedExperts:
    """Stack experts that are each an MLP — Linear(H→I) → act → Linear(I→H), or a GLU whose two H→I Linears
    are combined by the activation — into a `FusedExperts`; the activation is captured from the first
    expert's own forward with its Linears replaced by readers of the stacked up-projection. Raises `Reject`
    (or ValueError for a structure that is not such an MLP)."""
    first = experts[0]
    linears = [(n, c) for n, c in first.named_children() if isinstance(c, nn.Linear)]
    if len(linears) not in (2, 3) or any(type(e) is not type(first) for e in experts):
        raise ValueError("experts are not all one MLP class with 2 (MLP) or 3 (GLU) Linear children")
    _check_alike(experts, [n for n, _ in linears])
    down_name = _called_last(first, linears)
    ups = [n for n, _ in linears if n != down_name]
    i = first.get_submodule(down_name).in_features
    shapes = {(first.get_submodule(n).in_features, first.get_submodule(n).out_features) for n in ups}
    if shapes != {(first.get_submodule(down_name).out_features, i)}:
        raise ValueError(f"the up-projection Linears {ups} do not all map the hidden size to the width {i} "
                         f"the down-projection {down_name!r} reads")
    probe = copy.copy(first)  # shallow: the same parameters, its own child table
    probe._modules = dict(first._modules)
    for j, n in enumerate(ups):
        probe._modules[n] = _RowsOf(first.get_submodule(n), j * i, (j + 1) * i)
    probe._modules[down_name] = _Output(first.get_submodule(down_name))
    dropout = 0.0
    for n, c in first.named_children():
        if isinstance(c, nn.Dropout):
            dropout = max(dropout, c.p)
            probe._modules[n] = nn.Identity()
    probe.training = False
    activation = capture_activation(probe, i * len(ups))

    def stacked(get):
        parts = [get(e) for e in experts]
        return None if parts[0] is None else torch.stack(parts)

    w1 = stacked(lambda e: torch.cat([e.get_submodule(n).weight for n in ups]))
    has_b1 = first.get_submodule(ups[0]).bias is not None
    b1 = stacked(lambda e: torch.cat([e.get_submodule(n).bias for n in ups])) if has_b1 else None
    w2 = stacked(lambda e: e.get_submodule(down_name).weight)
    b2 = stacked(lambda e: e.get_submodule(down_name).bias)
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
    block = _user_block(m)
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
        if not name or any(name.startswith(done + ".") for done, _, _ in swaps):
            continue  # the root has no parent to swap it in; inside a module being replaced: goes with it
        build = _module_form(m)
        if build is None:
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
