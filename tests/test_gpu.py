"""The GPU lane: `pytest -m gpu` — every CUDA-only path, on one GPU, in a few minutes from a cold Triton cache.

    MOEFUSE_GPU_LANE=1 python -m pytest -m gpu tests/test_gpu.py tests/test_shared.py     # what gpu_check.sh runs

Without CUDA every test here is skipped — unless MOEFUSE_GPU_REHEARSAL=1 (tests/test_gpu_check.py, through
benchmarks/gpu_check.sh): then the tests that are not CUDA-only run on the CPU with the Triton kernels on the
interpreter, at tiny sizes, so the lane's own code cannot rot between GPU runs. CUDA-only tests (side stream,
CUDA graphs, the sync debug mode, TMA on sm_90) say so in their skip reason.

MOEFUSE_GPU_LANE=1 keeps tests/conftest.py from setting TRITON_INTERPRET=1, which would make every kernel defined
afterwards an interpreter kernel, on a GPU too. Tuning is off (MOEFUSE_AUTOTUNE=0) except in its own test: a
full tuning of every layer would take minutes.

Tolerances: fp32 against a float64 reference at fp32's summation-order level (1e-5, as tests/test_kernels.py);
fp16 / bf16 by `moefuse.testing.assert_parity` / `assert_model_parity` — within 3× eager's error in the same
dtype, both against one wider reference.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.spec import Activation, MoESpec
from moefuse.testing import FAMILIES, assert_model_parity, assert_parity, fp32_twin, num_moe_layers, rel_err, \
    tiny_model

ON_CUDA = torch.cuda.is_available()
REHEARSAL = not ON_CUDA and os.environ.get("MOEFUSE_GPU_REHEARSAL") == "1"
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CUDA and not REHEARSAL,
                       reason="needs a CUDA GPU (MOEFUSE_GPU_REHEARSAL=1 rehearses the lane on the interpreter)"),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only path: the CPU rehearsal cannot run it")

# Families whose layers hold a shared expert (side stream on CUDA), and the dtypes of the parity sweep. The
# rehearsal takes one of each (interpreter time).
SHARED_FAMILIES = ["qwen2_moe", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4"] if ON_CUDA else ["qwen2_moe"]
# bf16 (what people train in) for every family; fp16 for one family per expert form (SwiGLU [gate; up],
# GPT-OSS's interleaved clamped GLU with biases, Llama4's input-weighted top-1, DeepSeek-V3's grouped sigmoid
# routing with a shared expert) — a compile of a family costs seconds, and the lane has 4 minutes.
FP16_FAMILIES = {"mixtral", "gpt_oss", "llama4", "deepseek_v3"}
PARITY = ([(f, torch.bfloat16) for f in sorted(FAMILIES)] + [(f, torch.float16) for f in sorted(FP16_FAMILIES)]
          if ON_CUDA else [("qwen3_moe", torch.bfloat16)])


@pytest.fixture(autouse=True)
def lane(monkeypatch):
    """Tuning off (its own test turns it on), the interpreter on only in the rehearsal, fresh dynamo caches."""
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "0")
    if ON_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def family_model(family: str, dtype: torch.dtype, **kw):
    """The tiny model on DEVICE; skipped (with the reason) where this transformers lacks the family."""
    try:
        return tiny_model(family, dtype, **kw).to(DEVICE)
    except (AttributeError, ImportError, ValueError) as exc:
        pytest.skip(f"transformers cannot build {family}: {exc}")


def token_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ---------------------------------------------------------------------------------------------------------
# A layer problem on the device, and its references
# ---------------------------------------------------------------------------------------------------------


def problem(T: int, E: int, K: int, H: int, I: int, dtype: torch.dtype,  # noqa: E741
            ids: str = "random", seed: int = 0):
    """(spec, x, topk_ids, topk_weights, w1, w2) of a SwiGLU layer on DEVICE; ids: random | one_expert."""
    g = torch.Generator().manual_seed(seed)
    spec = MoESpec(E, K, H, I, 2 * I, Activation("silu(x0)*x1", ((0, 1), (I, 1))), str(dtype)[6:], str(dtype)[6:])
    x = torch.randn(T, H, generator=g)
    if ids == "one_expert":
        topk_ids = torch.zeros(T, K, dtype=torch.int64) if K == 1 else torch.arange(K).expand(T, K).contiguous()
    else:
        topk_ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K]
    topk_w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    cast = [t.to(DEVICE, dtype) for t in (x, w1, w2)]
    return spec, cast[0], topk_ids.to(DEVICE), topk_w.to(DEVICE), cast[1], cast[2]


def reference(x, topk_ids, topk_w, w1, w2, dtype=torch.float64):
    """y of the SwiGLU MoE, expert by expert, in `dtype` (float64: the reference; the layer's dtype: eager)."""
    x, topk_w, w1, w2 = (t.to(dtype) for t in (x, topk_w, w1, w2))
    I = w2.shape[-1]  # noqa: E741
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel():
            h = x[token] @ w1[e].t()
            y.index_add_(0, token, topk_w[token, slot, None] * ((F.silu(h[:, :I]) * h[:, I:]) @ w2[e].t()))
    return y


def assert_y(y, spec, x, ids, w, w1, w2):
    dtype = x.dtype
    want = reference(x, ids, w, w1, w2)
    if dtype == torch.float32:
        assert rel_err(y, want) <= 1e-5  # "ieee" fp32: summation order only
    else:
        assert_parity(y, reference(x, ids, w, w1, w2, dtype), want, dtype)


# ---------------------------------------------------------------------------------------------------------
# Shared experts on the side stream: forward and backward of whole models
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_shared_expert_training_step_on_the_side_stream(family, monkeypatch):
    """One training step of a model with a shared expert: on CUDA the shared MLP's forward and backward run on
    the side stream (the first backward crashed there once); loss and every gradient match eager's."""
    from moefuse.runtime import autograd as autograd_rt

    model = family_model(family, torch.float32).train()
    ids = token_ids(2, 8)
    streams = []
    for mod, name in ((moe_op, "shared_forward"), (autograd_rt, "shared_backward")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            streams.append((_name, torch.cuda.current_stream() if ON_CUDA else None))
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)

    def step(m):
        m.zero_grad()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = step(model)
    streams.clear()
    backend = Backend({"inner": "eager"})
    before = dict(moe_op.counters)
    loss, got = step(torch.compile(model, backend=backend))
    path = "triton"
    assert moe_op.counters[f"fwd_train_{path}"] - before[f"fwd_train_{path}"] == num_moe_layers(model)
    assert moe_op.counters[f"bwd_{path}"] - before[f"bwd_{path}"] == num_moe_layers(model)
    assert all(layer.spec.shared is not None for layer in backend.explanation.lowered), str(backend.explanation)
    assert {name for name, _ in streams} == {"shared_forward", "shared_backward"}
    if ON_CUDA:
        main = torch.cuda.current_stream()
        assert all(s != main for _, s in streams), "the shared MLP ran on the main stream"
        assert len({s for _, s in streams}) == 1  # one side stream (runtime.shared._side_stream), reused
        torch.cuda.synchronize()
    assert rel_err(loss, ref_loss) <= 1e-4
    assert got.keys() == ref.keys()
    worst = max(ref, key=lambda n: rel_err(got[n], ref[n]))
    assert rel_err(got[worst], ref[worst]) <= 1e-4, worst  # fp32 "ieee" kernels vs fp32 eager (TF32 off)


# ---------------------------------------------------------------------------------------------------------
# bf16 / fp16 parity of the named families through the Triton kernels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,dtype", PARITY, ids=str)
def test_family_parity_through_the_kernels(family, dtype):
    model = family_model(family, dtype)
    ids = token_ids(2, 9)
    with torch.no_grad():
        eager = model(ids).logits
        ref32 = fp32_twin(model)(ids).logits
        backend = Backend({"inner": "eager"})
        before = moe_op.counters["triton"]
        out = torch.compile(model, backend=backend)(ids).logits
    assert not backend.explanation.rejected and len(backend.explanation.lowered) == num_moe_layers(model), \
        str(backend.explanation)
    assert moe_op.counters["triton"] - before == num_moe_layers(model)
    assert_model_parity(out, eager, ref32, dtype, what=family)


# ---------------------------------------------------------------------------------------------------------
# TF32: the kernels' fp32 GEMMs are "ieee" whatever torch's flags say
# ---------------------------------------------------------------------------------------------------------


def test_tf32_flags_do_not_reach_the_kernels():
    """fp32 with TF32 off and on: the routed kernels give the same bits (input_precision="ieee"), within fp32
    summation order of float64 — TF32 would be ~1e-3 off."""
    spec, x, ids, w, w1, w2 = problem(T=64 if ON_CUDA else 9, E=8 if ON_CUDA else 4, K=2, H=256 if ON_CUDA else 32,
                                      I=128 if ON_CUDA else 16, dtype=torch.float32)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        off = moe_op.moe_call(spec, x, ids, w, w1, w2)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        on = moe_op.moe_call(spec, x, ids, w, w1, w2)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_float32_matmul_precision(flags[2])
    assert torch.equal(off, on)
    assert_y(off, spec, x, ids, w, w1, w2)


# ---------------------------------------------------------------------------------------------------------
# The persistent grid and TMA (on CUDA reachable only through tuning): each variant directly
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["per_tile", "persistent", "persistent_tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_schedule_variants(variant, dtype, monkeypatch):
    from moefuse.kernels import grouped_gemm as gg
    from moefuse.kernels.codegen import load_activation
    from moefuse.kernels.grouped_gemm import GemmConfig
    from moefuse.kernels.moe import moe_forward

    if dtype == torch.float16 and not ON_CUDA:
        pytest.skip("rehearsal: bf16 and fp32 cover the code")
    base = GemmConfig.default(dtype) if ON_CUDA else GemmConfig(16, 32, 32, 4, 1)
    config = {"per_tile": base, "persistent": dataclasses.replace(base, persistent=True, group_m=2),
              "persistent_tma": dataclasses.replace(base, persistent=True, group_m=2, tma=True)}[variant]
    made = []
    real = gg.TensorDescriptor
    monkeypatch.setattr(gg, "TensorDescriptor", lambda *a: made.append(a) or real(*a))
    # T·K rows over E experts: several M-tiles per expert, a partial last one
    spec, x, ids, w, w1, w2 = problem(T=1000 if ON_CUDA else 37, E=8 if ON_CUDA else 3, K=2,
                                      H=512 if ON_CUDA else 32, I=256 if ON_CUDA else 32, dtype=dtype)
    y = moe_forward(spec, x, ids, w, w1, w2, activation=load_activation(spec.activation.expr, 2), config=config)
    assert_y(y, spec, x, ids, w, w1, w2)
    half = dtype != torch.float32
    capable = not ON_CUDA or torch.cuda.get_device_capability(DEVICE)[0] >= 9
    assert bool(made) == (variant == "persistent_tma" and half and capable), len(made)


# ---------------------------------------------------------------------------------------------------------
# Tuning with the real timer, and its disk cache
# ---------------------------------------------------------------------------------------------------------


def test_tuning_real_timer_and_disk_cache(tmp_path, monkeypatch):
    """The timer of the device (triton's do_bench on CUDA) picks a config from a small space; the winner — on
    sm_90 raced against its persistent and TMA variants — is written to the cache directory; a fresh process
    (the in-memory memo cleared) reads it back without timing anything; the op runs with it."""
    from moefuse.kernels.codegen import load_activation
    from moefuse.kernels.moe import moe_forward
    from moefuse.runtime import tuning

    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_chosen", {})
    dtype = torch.bfloat16
    spec, x, ids, w, w1, w2 = problem(T=512 if ON_CUDA else 9, E=8 if ON_CUDA else 3, K=2, H=256 if ON_CUDA else 32,
                                      I=128 if ON_CUDA else 16, dtype=dtype)
    act = load_activation(spec.activation.expr, 2)
    space = (tuning.ConfigSpace(block_m=(64,), block_n=(64, 128), block_k=(64,), num_warps=(4,), num_stages=(3,))
             if ON_CUDA else tuning.ConfigSpace((16,), (16, 32), (32,), (4,), (1,)))
    timed = []
    real_time = tuning.time_ms
    monkeypatch.setattr(tuning, "time_ms", lambda *a, **k: timed.append(1) or real_time(*a, **k))

    def run(config):
        return moe_forward(spec, x, ids, w, w1, w2, activation=act, config=config)

    config = tuning.gemm_config(spec, x, ids, run, space=space)
    assert len(timed) >= 2
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr(tuning, "_chosen", {})
    timed.clear()
    assert tuning.gemm_config(spec, x, ids, run, space=space) == config and not timed  # from disk
    assert_y(run(config), spec, x, ids, w, w1, w2)


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs without host sync: the inference op, and a compiled decode step
# ---------------------------------------------------------------------------------------------------------


@cuda_only
def test_cuda_graph_capture_and_replay_of_the_op():
    """The op captured once replays with new tokens and new routing (other per-expert counts) and no host sync
    (sync debug mode "error" around capture and replay)."""
    spec, x, ids, w, w1, w2 = problem(T=64, E=8, K=2, H=256, I=128, dtype=torch.bfloat16)
    static = [t.clone() for t in (x, ids, w)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream: kernels compiled, caches filled
        for _ in range(2):
            moe_op.moe_call(spec, *static, w1, w2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pairs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            y = moe_op.moe_call(spec, *static, w1, w2)
        for seed, routing in ((1, "random"), (2, "one_expert")):  # new counts per expert, same graph
            _, x2, ids2, w2_, _, _ = problem(T=64, E=8, K=2, H=256, I=128, dtype=torch.bfloat16, seed=seed,
                                             ids=routing)
            for dst, src in zip(static, (x2, ids2, w2_)):
                dst.copy_(src)
            graph.replay()
            pairs.append((y.clone(), moe_op.moe_call(spec, *static, w1, w2)))  # eager on the same inputs
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for replayed, eager in pairs:
        assert torch.equal(replayed, eager)


@cuda_only
def test_cuda_graph_of_a_compiled_decode_step():
    """A compiled MoE block at decode (T = 1 token), captured in a CUDA graph with no host sync, replays with
    new tokens and gives eager's numbers."""
    model = family_model("qwen3_moe", torch.bfloat16)
    block = model.model.layers[0].mlp
    backend = Backend({"inner": "eager"})
    compiled = torch.compile(block, backend=backend)
    x = torch.randn(1, 1, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(x)  # compiles (verification syncs: before the debug mode)
        assert len(backend.explanation.lowered) == 1, str(backend.explanation)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            compiled(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                y = compiled(x)
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x))
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = block(x)
        ref32 = first(fp32_twin(block)(x.float()))
    torch.cuda.synchronize()
    assert_model_parity(first(y), first(want), ref32, torch.bfloat16, what="replayed decode step")


def first(out):
    """A block's output tensor (some return (hidden, router_logits))."""
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------------------
# Token-count edges: T = 0, 1, every token on one expert — forward and backward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["T=0", "T=1", "one_expert"])
def test_token_count_edges(case):
    T = {"T=0": 0, "T=1": 1, "one_expert": 300 if ON_CUDA else 20}[case]
    dtype = torch.bfloat16
    spec, x, ids, w, w1, w2 = problem(T=T, E=8 if ON_CUDA else 4, K=2, H=128 if ON_CUDA else 32,
                                      I=64 if ON_CUDA else 16, dtype=dtype,
                                      ids="one_expert" if case == "one_expert" else "random")
    y = moe_op.moe_call(spec, x, ids, w, w1, w2)
    assert y.shape == (T, spec.hidden) and y.dtype == dtype
    assert_y(y, spec, x, ids, w, w1, w2)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w1, w2)]
    y_train, _ = torch.ops.moefuse.moe_fwd(leaves[0], ids, leaves[1], leaves[2], leaves[3], None, None, spec.to_key())
    y_train.sum().backward()
    if T == 0:  # no pairs: empty dx and dw, zero weight gradients
        assert all(not t.grad.any() and t.grad.shape == t.shape for t in leaves)
        return
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, w1, w2)]
    reference(ref_leaves[0], ids, *ref_leaves[1:]).sum().backward()
    eager_leaves = [t.detach().clone().requires_grad_() for t in (x, w, w1, w2)]
    reference(eager_leaves[0], ids, *eager_leaves[1:], dtype=dtype).sum().backward()
    for name, got, want, eager in zip(("dx", "dw", "dw1", "dw2"), leaves, ref_leaves, eager_leaves):
        assert got.grad.shape == want.shape, name
        assert_parity(got.grad, eager.grad, want.grad, dtype, what=name)
