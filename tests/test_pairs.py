"""The fused MoE on flat pairs (`moefuse::moe_pairs` and its training pair, `moefuse.runtime.pairs`), forward
and every gradient, on the Triton kernels under the interpreter and on the CPU path:

  - exact top-K passed as flat pairs (with an unused tail, as token rounding's S_max buffers have) gives what
    `moefuse::moe` / `moe_fwd` / `moe_bwd` give;
  - variable-count pairs (tokens with 0, 1 and many experts in any order, an expert without tokens, unused
    slots whose token and weight must not leak) match a float64 per-token loop differentiated by torch.autograd.
"""
import os

# Before triton or moefuse's kernels are imported: `triton.jit` picks the interpreter when a kernel is defined.
os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_backward_kernels import ACTS, assert_grads_close, slices_of  # noqa: E402

from moefuse.rounding import exact_pairs  # noqa: E402
from moefuse.runtime import op  # noqa: E402
from moefuse.runtime.pairs import FlatPairs, fused_moe_pairs  # noqa: E402
from moefuse.spec import Activation, MoESpec  # noqa: E402
from moefuse.testing import UNIT_ROUNDOFF, assert_parity  # noqa: E402

# The interpreter evaluates with numpy, which warns where a branch that tl.where then discards divides 0/0 (the
# small-|x| branch of gelu-tanh's expm1 helper); the results are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# bf16 through the interpreter's tl.dot by the shim conftest installs (moefuse.testing.install_interpreter_bf16_dot)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ("triton", "cpu")  # the kernels under TRITON_INTERPRET=1; the torch CPU plan without it
# (assert_grads_close's names: the routing weights' gradient is dpair_weight here, checked under "dtopk_w")
GRADS = ("dx", "dtopk_w", "dw1", "dw2", "db1", "db2")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@dataclass(frozen=True)
class Layer:
    act: str  # a key of test_backward_kernels.ACTS
    layout: str  # gate_up | plain
    bias: bool
    E: int = 5
    H: int = 32
    I: int = 32  # noqa: E741


LAYERS = {
    "swiglu_biases": Layer("swiglu", "gate_up", bias=True),  # GLU: two activation inputs; db1, db2, ⟨dy, b2⟩
    "gelu_tanh": Layer("gelu_tanh", "plain", bias=False),  # non-GLU, one input, no bias
}


def make_layer(layer: Layer, dtype: torch.dtype, top_k: int, gen: torch.Generator):
    """(spec, w1, w2, b1, b2) with random weights in `dtype`."""
    slices = slices_of(layer.layout, layer.I)
    up_rows = layer.I * len(slices)
    name = str(dtype).removeprefix("torch.")
    spec = MoESpec(num_experts=layer.E, top_k=top_k, hidden=layer.H, intermediate=layer.I, up_rows=up_rows,
                   activation=Activation(ACTS[layer.act].expr, slices), dtype=name, out_dtype=name,
                   w1_bias=layer.bias, w2_bias=layer.bias)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    w1 = randn(layer.E, up_rows, layer.H, scale=layer.H**-0.5)
    w2 = randn(layer.E, layer.H, layer.I, scale=layer.I**-0.5)
    b1 = randn(layer.E, up_rows, scale=0.5) if layer.bias else None
    b2 = randn(layer.E, layer.H, scale=0.5) if layer.bias else None
    return spec, w1, w2, b1, b2


# Variable-count routing over E = 5 experts; expert 4 gets no token. Each token's experts in a shuffled order
# (the contract only asks for token-major pairs).
EXPERTS_OF_TOKEN = (
    (),  # token 0: no expert, y = 0, dx = 0
    (2,),  # one expert
    (3, 0, 1),  # many, not sorted
    (1,),
    (),  # another empty token in the middle of the pairs
    (0, 3, 2, 1),  # all the used experts
    (3, 0),
    (2, 1),
)
UNUSED_TAIL = 6  # slots past token_offsets[T]: expert -1, weight 0, token 3 (a real token: a leak would show)


def variable_pairs(weights: torch.Tensor) -> FlatPairs:
    """FlatPairs of EXPERTS_OF_TOKEN with pair weights `weights` [used pairs] and the unused tail."""
    token = [t for t, experts in enumerate(EXPERTS_OF_TOKEN) for _ in experts] + [3] * UNUSED_TAIL
    expert = [e for experts in EXPERTS_OF_TOKEN for e in experts] + [-1] * UNUSED_TAIL
    counts = torch.tensor([len(experts) for experts in EXPERTS_OF_TOKEN])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    weight = torch.cat([weights, weights.new_zeros(UNUSED_TAIL)])
    i32 = torch.int32
    return FlatPairs(torch.tensor(token, dtype=i32), torch.tensor(expert, dtype=i32), weight, offsets.to(i32))


def with_tail(pairs: FlatPairs, tail: int) -> FlatPairs:
    """The same pairs in a buffer `tail` slots longer (token rounding's S_max), the tail unused."""
    pad = (0, tail)
    return FlatPairs(torch.nn.functional.pad(pairs.token, pad, value=0),
                     torch.nn.functional.pad(pairs.expert, pad, value=-1),
                     torch.nn.functional.pad(pairs.weight, pad, value=0.0), pairs.token_offsets)


def naive_y(spec: MoESpec, act, x, pairs: FlatPairs, w1, w2, b1, b2, dtype=torch.float64) -> torch.Tensor:
    """y [T, H] in float64 (or `dtype`: eager's numbers) from a per-token loop over each token's pairs,
    differentiable in every input."""
    x, s, w1, w2 = x.to(dtype), pairs.weight.to(dtype), w1.to(dtype), w2.to(dtype)
    b1, b2 = (b.to(dtype) if b is not None else None for b in (b1, b2))
    cols = torch.arange(spec.intermediate)
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros(spec.hidden, dtype=dtype)
        for p in range(int(pairs.token_offsets[t]), int(pairs.token_offsets[t + 1])):
            e = int(pairs.expert[p])
            h = w1[e] @ x[t] + (b1[e] if b1 is not None else 0)
            o = w2[e] @ act.torch_fn(*(h[off + step * cols] for off, step in spec.activation.slices))
            y_t = y_t + s[p] * (o + (b2[e] if b2 is not None else 0))
        rows.append(y_t)
    return torch.stack(rows)


def reference(spec: MoESpec, act, x, pairs: FlatPairs, w1, w2, b1, b2, dy, dtype=torch.float64):
    """(y, grads) of `naive_y` in float64 (or `dtype`: eager's), by torch.autograd; grads in GRADS order, the
    routing weights' gradient [S_max] (0 in the tail)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, pairs.weight, w1, w2, b1, b2)]
    x_, s_, w1_, w2_, b1_, b2_ = leaves
    y = naive_y(spec, act, x_, pairs._replace(weight=s_), w1_, w2_, b1_, b2_, dtype)
    present = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(y, present, dy.to(dtype), materialize_grads=True))
    return y.detach(), {name: next(grads) if leaf is not None else None for name, leaf in zip(GRADS, leaves)}


def run_op(spec: MoESpec, x, pairs: FlatPairs, w1, w2, b1, b2, dy):
    """(y of the inference op, y of the training op, grads of the training op) through `fused_moe_pairs`."""
    with torch.no_grad():
        y_inference = fused_moe_pairs(spec, x, pairs, w1, w2, b1, b2)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, pairs.weight, w1, w2, b1, b2)]
    x_, s_, w1_, w2_, b1_, b2_ = leaves
    y = fused_moe_pairs(spec, x_, pairs._replace(weight=s_), w1_, w2_, b1_, b2_)
    y.backward(dy)
    grads = {name: leaf.grad if leaf is not None else None for name, leaf in zip(GRADS, leaves)}
    return y_inference, y.detach(), grads


def counts_since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in op.counters.items() if v != before[k]}


# ---------------------------------------------------------------------------------------------------------
# Exact top-K as flat pairs is moefuse::moe
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_top_k_as_flat_pairs_is_the_moe_op(path, dtype):
    # T = 9, K = 2 over E = 5: the same rows in the same order per expert, the same per-token sums. The pairs sit
    # in a buffer with an E·(M−1) tail (M = 4), as token rounding's S_max = T·K + E·(M−1) buffers.
    gen = torch.Generator().manual_seed(1)
    spec, w1, w2, b1, b2 = make_layer(LAYERS["swiglu_biases"], dtype, top_k=2, gen=gen)
    T, K, E = 9, 2, spec.num_experts
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    topk_w, topk_ids = torch.topk(torch.randn(T, E, generator=gen).softmax(-1), K)
    dy = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    pairs = with_tail(exact_pairs(topk_ids, topk_w), E * 3)

    before = dict(op.counters)
    y_inference, y, grads = run_op(spec, x, pairs, w1, w2, b1, b2, dy)
    assert counts_since(before) == {f"pairs_{path}": 1, f"pairs_fwd_train_{path}": 1, f"pairs_bwd_{path}": 1}

    before = dict(op.counters)
    want_y = torch.ops.moefuse.moe(x, topk_ids, topk_w, w1, w2, b1, b2, spec.to_key())
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, topk_w, w1, w2, b1, b2)]
    y_train = torch.ops.moefuse.moe_fwd(leaves[0], topk_ids, *leaves[1:], spec.to_key())[0]
    y_train.backward(dy)
    assert counts_since(before) == {path: 1, f"fwd_train_{path}": 1, f"bwd_{path}": 1}
    want = {name: leaf.grad if leaf is not None else None for name, leaf in zip(GRADS, leaves)}
    # The routing weights' gradient: [T·K] in pair order, then 0 in the unused tail.
    want["dtopk_w"] = torch.cat([want["dtopk_w"].reshape(-1), want["dtopk_w"].new_zeros(E * 3)])

    if path == "triton":
        # The kernels see the same tiles and sum each token's pairs in the same order: bit for bit.
        assert torch.equal(y_inference, want_y) and torch.equal(y, want_y)
        for name in GRADS:
            assert torch.equal(grads[name], want[name]), name
    else:
        # The CPU plan combines [T, K] with a batched matmul and flat pairs with index_add: the same terms,
        # summed in fp32 in another order (1e-6 of fp32 sum-order difference), then rounded to the output dtype,
        # where that difference can flip one rounding: one ulp, 2u relative.
        tol = dict(atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype])
        torch.testing.assert_close(y_inference, want_y, **tol)
        torch.testing.assert_close(y, want_y, **tol)
        for name in GRADS:
            torch.testing.assert_close(grads[name], want[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Variable-count pairs against a float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_variable_count_pairs_match_reference(path, name, dtype):
    gen = torch.Generator().manual_seed(2)
    layer = LAYERS[name]
    spec, w1, w2, b1, b2 = make_layer(layer, dtype, top_k=2, gen=gen)  # top_k: the spec's, unused by the pairs op
    T = len(EXPERTS_OF_TOKEN)
    used = sum(len(experts) for experts in EXPERTS_OF_TOKEN)
    x = torch.randn(T, layer.H, generator=gen).to(dtype)
    pairs = variable_pairs(torch.rand(used, generator=gen) + 0.1)
    dy = torch.randn(T, layer.H, generator=gen).to(dtype)

    before = dict(op.counters)
    y_inference, y, got = run_op(spec, x, pairs, w1, w2, b1, b2, dy)
    assert counts_since(before) == {f"pairs_{path}": 1, f"pairs_fwd_train_{path}": 1, f"pairs_bwd_{path}": 1}
    want_y, want = reference(spec, ACTS[layer.act], x, pairs, w1, w2, b1, b2, dy)

    assert torch.equal(y_inference, y)  # the training op's y is the inference op's
    assert y.dtype == dtype and y.shape == (T, layer.H)
    for t, experts in enumerate(EXPERTS_OF_TOKEN):
        if not experts:  # a token without experts: exactly zero output and input gradient
            assert not y[t].any() and not got["dx"][t].any(), t
    assert not got["dtopk_w"][used:].any()  # unused slots get no gradient
    assert not got["dw1"][4].any() and not got["dw2"][4].any()  # nor does the expert without tokens
    # fp32: y's tolerance is test_kernels' (the forward's), the gradients' test_backward_kernels'; fp16 / bf16:
    # within eager's bound (the same loop and autograd in the dtype).
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-5)
        assert_grads_close(got, want, dtype)
    else:
        eager_y, eager = reference(spec, ACTS[layer.act], x, pairs, w1, w2, b1, b2, dy, dtype)
        assert_parity(y, eager_y, want_y, dtype, what="y")
        assert_grads_close(got, want, dtype, eager)


@pytest.mark.parametrize("mode", ["down", "nearest"])
def test_token_rounding_pairs_train_the_router(path, mode):
    # What token rounding hands the op (moefuse.rounding.round_routing, M = 16 over T = 28 tokens, E = 4, K = 2:
    # experts filled to 16 or emptied, so tokens with 0 to 4 experts, and an S_max tail): y and the gradients
    # of the router's logits (through the kept pairs' weights: routing weights or added scores) and of x,
    # against the float64 loop on the same pairs.
    from moefuse.rounding import round_routing

    gen = torch.Generator().manual_seed(6)
    spec, w1, w2, b1, b2 = make_layer(Layer("swiglu", "gate_up", bias=True, E=4), torch.float32, top_k=2, gen=gen)
    T, E = 28, spec.num_experts
    x = torch.randn(T, spec.hidden, generator=gen, requires_grad=True)
    logits = torch.randn(T, E, generator=gen, requires_grad=True)
    scores = logits.softmax(-1)
    topk_w, topk_ids = torch.topk(scores, 2)
    pairs = round_routing(scores, topk_ids, topk_w / topk_w.sum(-1, keepdim=True), mode=mode, tile_m=16)
    per_token = pairs.token_offsets.diff()
    assert (per_token != 2).any() and int(pairs.token_offsets[-1]) < pairs.expert.numel()  # not top-2; a tail

    before = dict(op.counters)
    y = fused_moe_pairs(spec, x, pairs, w1, w2, b1, b2)
    dy = torch.randn(T, spec.hidden, generator=gen)
    got = torch.autograd.grad(y, (logits, x), dy, retain_graph=True)  # the router graph serves both
    assert counts_since(before) == {f"pairs_fwd_train_{path}": 1, f"pairs_bwd_{path}": 1}
    y_ref = naive_y(spec, ACTS["swiglu"], x, pairs, w1, w2, b1, b2)
    want = torch.autograd.grad(y_ref, (logits, x), dy.double())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("logits", "x"), got, want):  # w in fp32: the reference's casts pass fp32 gradients back
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_no_tokens(path):
    # T = 0 with a buffer of unused slots (S_max = E·(M−1) > 0): an empty y, zero weight and bias gradients.
    gen = torch.Generator().manual_seed(7)
    spec, w1, w2, b1, b2 = make_layer(LAYERS["swiglu_biases"], torch.float32, top_k=2, gen=gen)
    pairs = with_tail(exact_pairs(torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2)), 15)
    x, dy = torch.zeros(0, spec.hidden), torch.zeros(0, spec.hidden)
    before = dict(op.counters)
    y_inference, y, grads = run_op(spec, x, pairs, w1, w2, b1, b2, dy)
    assert counts_since(before) == {f"pairs_{path}": 1, f"pairs_fwd_train_{path}": 1, f"pairs_bwd_{path}": 1}
    assert y_inference.shape == y.shape == (0, spec.hidden)
    for name in GRADS:
        assert grads[name] is not None and not grads[name].any(), name
    assert grads["dtopk_w"].shape == (15,)


def test_kernels_do_not_sync_with_the_host(monkeypatch):
    # The Triton host path of both ops reads nothing back from the device (CUDA-graph capturable): every way it
    # could is made to raise while the kernels run forward and backward.
    from moefuse.kernels.backward import moe_pairs_backward
    from moefuse.kernels.codegen import load_activation
    from moefuse.kernels.moe import moe_pairs_forward

    gen = torch.Generator().manual_seed(3)
    spec, w1, w2, b1, b2 = make_layer(LAYERS["swiglu_biases"], torch.float32, top_k=2, gen=gen)
    T = len(EXPERTS_OF_TOKEN)
    used = sum(len(experts) for experts in EXPERTS_OF_TOKEN)
    x, dy = torch.randn(T, spec.hidden, generator=gen), torch.randn(T, spec.hidden, generator=gen)
    pairs = variable_pairs(torch.rand(used, generator=gen))
    activation = load_activation(spec.activation.expr, spec.activation.num_inputs)

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in the flat-pairs kernels' host path")

    for name in ("item", "tolist", "nonzero", "unique", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    monkeypatch.setattr(torch, "unique", sync)
    y, h = moe_pairs_forward(spec, x, *pairs, w1, w2, b1, b2, activation=activation, save_h=True)
    grads = moe_pairs_backward(spec, dy, x, *pairs, w1, w2, b1, b2, h)
    monkeypatch.undo()
    want_y, want = reference(spec, ACTS["swiglu"], x, pairs, w1, w2, b1, b2, dy)
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-5)
    assert_grads_close(dict(zip(GRADS, grads)), want, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Tracing: fake implementations, the autograd registration, AOTAutograd
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cpu_path")
def test_opcheck():
    # Schema, fake tensors, the autograd registration and AOT dispatch with dynamic shapes for the three ops,
    # with and without biases (an absent bias: an empty gradient from moe_pairs_bwd).
    gen = torch.Generator().manual_seed(4)
    T = len(EXPERTS_OF_TOKEN)
    used = sum(len(experts) for experts in EXPERTS_OF_TOKEN)
    for layer in LAYERS.values():
        spec, w1, w2, b1, b2 = make_layer(layer, torch.float32, top_k=2, gen=gen)
        key = spec.to_key()
        x = torch.randn(T, spec.hidden, generator=gen, requires_grad=True)
        token, expert, weight, offsets = variable_pairs(torch.rand(used, generator=gen))
        weight.requires_grad_()
        weights = [t.requires_grad_() if t is not None else None for t in (w1, w2, b1, b2)]
        args = (x, token, expert, weight, offsets, *weights, key)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        if layer.bias:  # the forward ops once; the no-bias case matters for the backward's outputs
            torch.library.opcheck(torch.ops.moefuse.moe_pairs.default, detached)  # inference op: no autograd
            torch.library.opcheck(torch.ops.moefuse.moe_pairs_fwd.default, args)
        y, h = torch.ops.moefuse.moe_pairs_fwd(*detached)
        torch.library.opcheck(torch.ops.moefuse.moe_pairs_bwd.default, (torch.randn_like(y), *detached[:-1], h, key))


@pytest.mark.usefixtures("cpu_path")
def test_aot_eager_training_step():
    # fused_moe_pairs in one fullgraph through AOTAutograd: moe_pairs_fwd in the forward graph, moe_pairs_bwd in
    # the backward graph, the same numbers as eager; a dropped dynamo cache would show as a second compile.
    gen = torch.Generator().manual_seed(5)
    spec, w1, w2, b1, b2 = make_layer(LAYERS["swiglu_biases"], torch.float32, top_k=2, gen=gen)
    T = len(EXPERTS_OF_TOKEN)
    used = sum(len(experts) for experts in EXPERTS_OF_TOKEN)
    x = torch.randn(T, spec.hidden, generator=gen)
    pairs = variable_pairs(torch.rand(used, generator=gen))

    key = spec.to_key()  # inside compiled code the key, as the compiler's rewrites pass it

    def fn(x, weight, w1, w2, b1, b2):
        y = fused_moe_pairs(key, x, pairs._replace(weight=weight), w1, w2, b1, b2)
        return (y * y).sum()

    def run(f):
        args = [t.detach().clone().requires_grad_() for t in (x, pairs.weight, w1, w2, b1, b2)]
        loss = f(*args)
        loss.backward()
        return loss, [a.grad for a in args]

    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        def capture(gm, example_inputs):
            graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
            return boxed_nop(gm, example_inputs)

        return aot_autograd(fw_compiler=capture, bw_compiler=capture)(gm, example_inputs)

    eager_loss, eager_grads = run(fn)
    before = dict(op.counters)
    compiled_loss, compiled_grads = run(torch.compile(fn, backend=backend, fullgraph=True))
    assert counts_since(before) == {"pairs_fwd_train_cpu": 1, "pairs_bwd_cpu": 1}
    assert len(graphs) == 2
    assert "moefuse.moe_pairs_fwd.default" in graphs[0] and "moefuse.moe_pairs_bwd.default" in graphs[1]
    torch.testing.assert_close(compiled_loss, eager_loss, atol=0, rtol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
