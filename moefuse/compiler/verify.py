"""verify: before a region is rewritten, run it as captured and as the fused op on the same random inputs.

Structural matching pins down which values enter and leave the region; what happens in between (gate/up
order, casts, where the weights multiply, how the combine sums) is what this step checks, at the captured
shapes, once with uniform routing and once with every token on the same K experts (so capacity-style
effects would show). A disagreement rejects the region: moefuse never guesses.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu
from moefuse.passes.region import Reason, Region, Reject
from moefuse.runtime.cpu import moe_forward_cpu
from moefuse.runtime.op import shared_call
from moefuse.runtime.shared import overlapped

# Relative error (max |a-b| / max |b|) allowed between the captured region and the fused op. The op
# accumulates in fp32 and applies the activation in fp32, the captured graph rounds each op to the dtype:
# the gap is a few units of the dtype's last place, far below what any wrong layout or order produces (O(1)).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def extract(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region alone, as a GraphModule whose placeholders are `region.inputs`."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(region.inputs):
        env[n] = g.placeholder(f"in{i}_{n.name}")
    for n in region.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[region.output])
    return fx.GraphModule(gm, g)


def _probe_inputs(region: Region, skewed: bool, gen: torch.Generator) -> list:
    spec = region.spec
    t = fu.numel(region.x) // spec.hidden
    values = {}
    dev = fu.tensor(region.x).device

    def randn(node, scale):
        v = fu.tensor(node)
        return (torch.randn(fu.shape(node), generator=gen) * scale).to(device=dev, dtype=v.dtype)

    values[region.x] = randn(region.x, 1.0)
    e, k = spec.num_experts, spec.top_k
    if skewed:
        ids = torch.arange(k).expand(t, k)
    else:
        ids = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :k]
    # the routing as the code holds it: [T, K], or [B, S, K], [T·K] … (the op's operands reshape it back)
    ids = ids.to(device=dev, dtype=fu.tensor(region.topk_ids).dtype)
    wv = fu.tensor(region.topk_weights)
    wts = (torch.rand(t, k, generator=gen) + 0.1).to(device=dev, dtype=wv.dtype)
    if region.weight_on_input:
        values[region.topk_ids] = ids.contiguous()
        values[region.topk_weights] = region.probe_weights(values[region.topk_ids], wts)
    else:
        values[region.topk_ids] = ids.reshape(fu.shape(region.topk_ids)).contiguous()
        values[region.topk_weights] = wts.reshape(fu.shape(region.topk_weights)).contiguous()
    values[region.w1] = randn(region.w1, spec.hidden ** -0.5)
    values[region.w2] = randn(region.w2, spec.intermediate ** -0.5)
    if region.w3 is not None:
        values[region.w3] = randn(region.w3, spec.hidden ** -0.5)
    for b in (region.b1, region.b2):
        if b is not None:
            values[b] = randn(b, 0.1)
    for n in region.extra_inputs:
        v = fu.value(n)
        values[n] = fu.hint(v) if isinstance(v, torch.SymInt) else randn(n, 1.0) if isinstance(v, torch.Tensor) else v
    sh = region.shared
    if sh is not None:  # the shared MLP reads the same tokens (x, or the tensor x is a view of)
        values[sh.x] = values[region.x].reshape(fu.shape(sh.x))
        for w in (sh.w1, sh.w3, sh.gate):
            if w is not None:
                values[w] = randn(w, spec.hidden ** -0.5)
        values[sh.w2] = randn(sh.w2, spec.shared.intermediate ** -0.5)
    return [values[n] for n in region.inputs]


def signature(region: Region) -> tuple:
    """What the captured region computes, up to node names: its spec, the shapes and dtypes of its inputs, and
    each node's op with its arguments (other nodes as positions). Two regions with one signature compute the
    same function — the layers of one model usually do — so one verification serves both."""
    index = {n: ("in", i) for i, n in enumerate(region.inputs)}
    index.update({n: ("node", i) for i, n in enumerate(region.nodes)})

    def norm(a):
        return fx.node.map_arg(a, lambda n: index.get(n, ("outside", n.name)))

    inputs = tuple((fu.shape(n), str(getattr(fu.tensor(n), "dtype", None))) for n in region.inputs)
    body = tuple((fu.op_name(n), repr(norm(n.args)), repr(norm(n.kwargs))) for n in region.nodes)
    return region.spec.to_key(), inputs, body, index[region.output]


# Verified signatures → worst relative error, for this process (a signature never changes meaning).
_VERIFIED: dict[tuple, float] = {}


def verify(gm: fx.GraphModule, region: Region, seed: int = 0) -> float:
    """Raises `Reject` unless the fused op matches the captured region; returns the worst relative error.
    A region with the signature of one verified before is not run again."""
    key = signature(region)
    if key in _VERIFIED:
        return _VERIFIED[key]
    _VERIFIED[key] = worst = _probe(gm, region, seed)
    return worst


def _probe(gm: fx.GraphModule, region: Region, seed: int) -> float:
    sub = extract(gm, region)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for skewed in (False, True):
        args = _probe_inputs(region, skewed, gen)
        value = dict(zip(region.inputs, args))
        x, ids, wts = region.op_operands(value[region.x], value[region.topk_ids], value[region.topk_weights])
        w1, w2, w3 = region.op_weights(value[region.w1], value[region.w2], value.get(region.w3))
        b1, b2 = value.get(region.b1), value.get(region.b2)
        try:
            with torch.no_grad():
                expected = sub(*args)
                x = x.to(getattr(torch, region.spec.dtype))
                sh = region.shared
                # the op's own composition (runtime.shared.overlapped: sequential on the CPU), so the probe
                # checks the shared expert's form and the final add as well as the routed experts
                shared_w = [value.get(n) for n in (sh.w1, sh.w2, sh.gate, sh.w3)] if sh is not None else [None] * 4
                if sh is not None and region.weight_on_input:  # x above is scaled for the routed experts only
                    shared_w.append(value[region.x])
                got, shared_y = overlapped(x, shared_call(region.spec, x, *shared_w), lambda: moe_forward_cpu(
                        region.spec.routed(), x, ids, wts, w1, w2, b1, b2, **({"w3": w3} if w3 is not None else {})))
                if shared_y is not None:
                    got = got.add_(shared_y).reshape(expected.shape)
                elif region.output.meta["example_value"].dim() != 2:  # [B, S, H]: the rewrite views it back
                    got = got.view_as(value[region.x])
        except Exception as exc:  # the region runs arbitrary user ops: any failure means "do not lower"
            raise Reject(Reason.VERIFY_ERROR, region.output, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype:
            raise Reject(Reason.VERIFY_MISMATCH, region.output,
                         f"captured output {getattr(expected, 'shape', None)} {getattr(expected, 'dtype', None)}, "
                         f"fused {tuple(got.shape)} {got.dtype}")
        if expected.numel() == 0:
            # An empty batch (T=0) has nothing to compare; dynamo specialises size 0, so this graph only ever
            # runs empty batches, and shape and dtype were checked above.
            continue
        scale = expected.float().abs().max().clamp_min(1e-6)
        err = ((expected.float() - got.float()).abs().max() / scale).item()
        worst = max(worst, err)
        # the experts may compute in a narrower dtype than the layer's output (torchtitan's bf16 experts in an
        # fp32 model): the bound is that of the narrower one
        tolerance = max(TOLERANCE[expected.dtype], TOLERANCE[getattr(torch, region.spec.dtype)])
        if not err <= tolerance:
            routing = "skewed" if skewed else "uniform"
            raise Reject(Reason.VERIFY_MISMATCH, region.output,
                         f"relative error {err:.3g} > {tolerance:g} with {routing} routing")
    return worst
