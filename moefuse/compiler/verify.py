"""verify: before a region is rewritten, run it as captured and as the fused op on the same random inputs.

Structural matching pins down which values enter and leave the region; what happens in between (gate/up
order, casts, where the weights multiply, how the combine sums) is what this step checks, at the captured
shapes, once with uniform routing and once with every token on the same K experts (so capacity-style
effects would show). A disagreement rejects the region: moefuse never guesses.

The fused side is the op the rewritten graph will call — `moefuse::moe`, or `moefuse::moe_fwd` and its
backward when the region needs gradients — through the op's own dispatch on the captured device: the Triton
kernels on CUDA (and under TRITON_INTERPRET=1), the torch plan on other CPUs. So a region is reported
verified only if what will run on that device ran, forward and (for training) backward, and agreed. One probe
per distinct region signature, dispatch path and training flag (`verify`'s cache): the layers of one model
share one.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from moefuse.passes import fxutil as fu
from moefuse.passes.region import Reason, Region, Reject
from moefuse.runtime import op as _op
from moefuse.runtime.triton_path import triton_refusal
from moefuse.tolerance import parity_bound

# fp32 regions: the relative error (max |a-b| / max |b|) allowed between the captured region and the fused op —
# sums in another order, a few ulps, far below what any wrong layout or order produces (O(1)). fp16 / bf16
# regions: derived (`moefuse.tolerance.parity_bound`) — the captured region runs once more in fp32 as the
# reference, and the fused op's error must be within 3× the captured region's own (it rounds every op to the
# dtype) plus two output roundings. A fixed number here (2e-2 for fp16) once rejected a correct layer on one
# CPU and not another (0.0223); the table's half entries are only the fallback for a region that cannot run in
# fp32.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_HALF = (torch.float16, torch.bfloat16)


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
    for w, scale in ((region.w1, spec.hidden), (region.w2, spec.intermediate), (region.w3, spec.hidden)):
        for n in fu.nodes_of(w):  # one stacked parameter, or one per expert
            values[n] = randn(n, scale ** -0.5)
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


# Verified (signature, dispatch path, training) → worst relative error, for this process (a signature never
# changes meaning).
_VERIFIED: dict[tuple, float] = {}


def dispatch_path(region: Region) -> str:
    """Which implementation of the op will run this region: "triton" (CUDA, or the interpreter) or "cpu"."""
    return "triton" if _op._use_triton(fu.tensor(region.x)) else "cpu"


def check_runnable(region: Region) -> str:
    """Raises `Reject` when the path that will run the region on its device refuses its spec (a kernel
    limitation, with the kernel's reason) — checked with verification off too; returns the path."""
    path = dispatch_path(region)
    if path == "triton":
        refusal = triton_refusal(region.spec, training=region.needs_grad)
        if refusal is not None:  # say so at compile time rather than raise at the first call
            raise Reject(Reason.UNSUPPORTED_ACTIVATION, region.output, refusal)
    return path


def verify(gm: fx.GraphModule, region: Region, seed: int = 0) -> float:
    """Raises `Reject` unless the fused op, through the dispatch it will run on, matches the captured region
    (forward; and backward when the region needs gradients); returns the worst relative error. A region with
    the signature of one verified before on the same path is not run again."""
    path = check_runnable(region)
    key = (signature(region), path, region.needs_grad)
    if key in _VERIFIED:
        return _VERIFIED[key]
    counters = dict(_op.counters)  # the probe's calls are not the model's: the counters count those
    try:
        worst = _probe(gm, region, seed)
    finally:
        _op.counters.update(counters)
    _VERIFIED[key] = worst
    return worst


def _fused(region: Region, value: dict, train: bool):
    """The op the rewrite emits, called eagerly on the probe's values (the op's own dispatch and composition:
    the shared expert on a side stream on CUDA, the final add)."""
    x, ids, wts = region.op_operands(value[region.x], value[region.topk_ids], value[region.topk_weights])
    x = x.to(getattr(torch, region.spec.dtype))
    w1, w2, w3 = region.op_weights(*(None if w is None else [value[n] for n in w] if isinstance(w, list) else value[w]
                                     for w in (region.w1, region.w2, region.w3)))
    sh = region.shared
    shared_w = [value.get(n) for n in (sh.w1, sh.w2, sh.gate, sh.w3)] if sh is not None else []
    if sh is not None and region.weight_on_input:  # x above is scaled for the routed experts only
        shared_w.append(value[region.x])
    args = (x, ids, wts, w1, w2, value.get(region.b1), value.get(region.b2), region.spec.to_key(), *shared_w)
    kwargs = {"w3": w3} if w3 is not None else {}
    y = torch.ops.moefuse.moe_fwd(*args, **kwargs)[0] if train else torch.ops.moefuse.moe(*args, **kwargs)
    if sh is None and region.output.meta["example_value"].dim() != 2:  # [B, S, H]: the rewrite views it back
        y = y.view_as(value[region.x])
    return y


def _differentiable(region: Region) -> list[fx.Node]:
    """The region inputs gradients flow to in training: tokens (and the tensor the shared expert reads them
    as), routing weights, expert and shared weights."""
    nodes = [region.x, region.topk_weights, *fu.nodes_of(region.w1), *fu.nodes_of(region.w2),
             *fu.nodes_of(region.w3), region.b1, region.b2]
    if region.shared is not None:
        sh = region.shared
        nodes += [sh.x, sh.w1, sh.w2, sh.gate, sh.w3]
    return list(dict.fromkeys(n for n in nodes if n is not None))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-6)
    return ((expected.float() - got.float()).abs().max() / scale).item()


def _probe(gm: fx.GraphModule, region: Region, seed: int) -> float:
    sub = extract(gm, region)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for skewed in (False, True):
        routing = "skewed" if skewed else "uniform"
        args = _probe_inputs(region, skewed, gen)
        value = dict(zip(region.inputs, args))
        try:
            with torch.no_grad():
                expected = sub(*args)
                got = _fused(region, value, train=False)
                if region.shared is not None:
                    got = got.reshape(expected.shape)
        except Exception as exc:  # the region runs arbitrary user ops: any failure means "do not lower"
            raise Reject(Reason.VERIFY_ERROR, region.output, f"{type(exc).__name__}: {exc}") from exc
        _check(region, expected, got, f"{routing} routing", _wide_run(sub, args, expected))
        if expected.numel() == 0:
            # An empty batch (T=0) has nothing to compare; dynamo specialises size 0, so this graph only ever
            # runs empty batches, and shape and dtype were checked above.
            continue
        worst = max(worst, _relative_error(got, expected))
        if region.needs_grad:
            worst = max(worst, _probe_backward(sub, region, args, gen, routing))
    return worst


def _probe_backward(sub: fx.GraphModule, region: Region, args: list, gen: torch.Generator, routing: str) -> float:
    """The training op's forward and backward against autograd through the captured region, on the same inputs
    and output gradient: the output and every input gradient must agree (fp16 / bf16: each against the captured
    region's fp32 run as well, see `_check`)."""
    differentiable = set(_differentiable(region))
    half = any(isinstance(a, torch.Tensor) and a.dtype in _HALF for a in args)
    results = {}
    dy = None
    for run in ("captured", "fused", "wide") if half else ("captured", "fused"):
        inputs = _widen(args) if run == "wide" else args
        leaves = [a.detach().clone().requires_grad_() if n in differentiable and a.is_floating_point() else a
                  for n, a in zip(region.inputs, inputs)]
        try:
            with torch.enable_grad():
                y = _fused(region, dict(zip(region.inputs, leaves)), train=True) if run == "fused" else sub(*leaves)
                if dy is None:
                    dy = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)  # CUDA: y is there
                y.reshape(dy.shape).backward(dy.to(y.dtype))
        except Exception as exc:
            if run == "wide":  # a region that needs its dtype: the fixed tolerance applies
                break
            side = "the fused training op" if run == "fused" else "the captured region"
            raise Reject(Reason.VERIFY_ERROR, region.output,
                         f"backward of {side}: {type(exc).__name__}: {exc}") from exc
        results[run] = (y.detach().reshape(dy.shape), [leaf.grad if isinstance(leaf, torch.Tensor) and
                                                       leaf.requires_grad else None for leaf in leaves])
    (expected, want), (got, grads) = results["captured"], results["fused"]
    wide_y, wide_grads = results.get("wide", (None, [None] * len(region.inputs)))
    _check(region, expected, got, f"{routing} routing, training op", wide_y)
    worst = _relative_error(got, expected)
    sh = region.shared
    if sh is not None and sh.x is not region.x:
        # The captured region reads the tokens twice (x, and the tensor x is a view of for the shared MLP); the
        # op reads x once and returns the sum of both paths' gradients in x's.
        i, j = region.inputs.index(region.x), region.inputs.index(sh.x)
        for gs in (want, grads, wide_grads):
            if gs[j] is not None:
                gs[i] = gs[j].reshape(args[i].shape) if gs[i] is None else gs[i] + gs[j].reshape(gs[i].shape)
                gs[j] = None
    for node, g, w, wg in zip(region.inputs, grads, want, wide_grads):
        if node not in differentiable or (g is None and w is None):
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        _check(region, w, g, f"{routing} routing, gradient of {node.name}", wg)
        if w.numel():
            worst = max(worst, _relative_error(g, w))
    return worst


def _widen(args: list) -> list:
    """fp16 / bf16 tensors in fp32 (exact), everything else as it is."""
    return [a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args]


def _wide_run(sub: fx.GraphModule, args: list, expected) -> torch.Tensor | None:
    """The captured region in fp32 — the reference of a half-precision region's check — or None for an fp32
    region, or where the region cannot run in fp32 (then `TOLERANCE` applies)."""
    if not isinstance(expected, torch.Tensor) or expected.dtype not in _HALF or expected.numel() == 0:
        return None
    try:
        with torch.no_grad():
            wide = sub(*_widen(args))
    except Exception:  # noqa: BLE001 — a region that needs its dtype: the table's fallback
        return None
    return wide if isinstance(wide, torch.Tensor) and wide.shape == expected.shape else None


def _check(region: Region, expected, got, what: str, wide: torch.Tensor | None = None) -> None:
    """The fused op's `got` against the captured region's `expected`: within TOLERANCE (fp32), or within
    `parity_bound` of the captured region's own error against its fp32 run `wide` (fp16 / bf16)."""
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype:
        raise Reject(Reason.VERIFY_MISMATCH, region.output,
                     f"{what}: captured {getattr(expected, 'shape', None)} {getattr(expected, 'dtype', None)}, "
                     f"fused {tuple(got.shape)} {got.dtype}")
    if expected.numel() == 0:
        return
    if wide is not None:
        scale = wide.double().abs().max().clamp_min(1e-30).item()
        err = (got.double() - wide.double()).abs().max().item()
        bound = parity_bound(expected, wide, expected.dtype)
        if not err <= bound:
            raise Reject(Reason.VERIFY_MISMATCH, region.output,
                         f"error {err / scale:.3g} of the fp32 run's scale > {bound / scale:.3g} (3× the captured "
                         f"region's own error + 2 roundings) with {what}")
        return
    # the experts may compute in a narrower dtype than the layer's output (torchtitan's bf16 experts in an fp32
    # model): the captured region rounds to that dtype inside, so the bound is the narrower dtype's
    tolerance = max(TOLERANCE[expected.dtype], TOLERANCE[getattr(torch, region.spec.dtype)])
    err = _relative_error(got, expected)
    if not err <= tolerance:
        raise Reject(Reason.VERIFY_MISMATCH, region.output, f"relative error {err:.3g} > {tolerance:g} with {what}")
