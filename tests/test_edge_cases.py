"""Routing edge cases, NaN/Inf, determinism, 64-bit indexing and bad input, through both paths of the op.

Each test runs `moefuse::moe` (or its training pair) on the Triton kernels under the interpreter
(TRITON_INTERPRET=1) and on the CPU path (the generated C++ kernels for fp32/bf16, the torch plan for fp16),
checks on `op.counters` that the path it names really ran, and
compares with a plain PyTorch reference (`test_kernels.reference_moe`: a loop over tokens and their slots,
which is what transformers' eager experts and its grouped_mm compute).

Covered elsewhere, so not repeated here:
  expert with no tokens, all tokens on one expert, K = E, T = 1      test_kernels.CASES: forward on the
      interpreter (test_moe_forward_matches_reference) and the CPU plan (test_cpu_path_matches_reference);
      gradients in test_backward_kernels.CASES and test_autograd
  T = 0 in the kernels themselves       test_kernels::test_T_zero_returns_empty, test_backward_kernels::test_T_zero,
                                        test_autograd::test_no_tokens
  non-contiguous / transposed weights   test_kernels.CASES["transposed_weights"], ["strided_inputs"] (accepted
                                        with any strides by design, never copied)
  determinism of a compiled model       test_guards::test_deterministic_outputs_and_gradients; of the kernels:
                                        test_kernels::test_deterministic, test_backward_kernels::test_deterministic
  wrong options                         test_backend::test_options_validated, test_options_from_environment
  recompiles over five token counts     test_guards::test_five_token_counts_compile_at_most_twice
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import TOLERANCES, Case, assert_matches_reference, make_problem, reference_moe

from moefuse import Backend
from moefuse.runtime import op
from moefuse.spec import MoESpec
from moefuse.testing import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATHS = ("interpreter", "cpu")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The op's path under test: "interpreter" (Triton kernels, TRITON_INTERPRET=1) or "cpu" (the generated C++
    kernels, or the torch plan where they cannot run)."""
    if request.param == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def run_op(path: str, spec, *args) -> torch.Tensor:
    """moefuse::moe on `path`, asserting that this path (and not the other) ran it."""
    counter = "triton" if path == "interpreter" else "cpu"
    before = op.counters[counter]
    y = op.moe_call(spec, *args)
    assert op.counters[counter] == before + 1, f"moefuse::moe did not run on the {path} path"
    return y


def train_op(path: str, spec, x, ids, w, w1, w2, b1, b2, dy):
    """(y, {name: grad}) through moefuse::moe_fwd / moe_bwd on `path`."""
    fwd, bwd = ("fwd_train_triton", "bwd_triton") if path == "interpreter" else ("fwd_train_cpu", "bwd_cpu")
    before = dict(op.counters)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in
              (("x", x), ("w", w), ("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)) if t is not None}
    y, _ = torch.ops.moefuse.moe_fwd(leaves["x"], ids, leaves["w"], leaves["w1"], leaves["w2"], leaves.get("b1"),
                                     leaves.get("b2"), spec.to_key())
    y.backward(dy)
    assert (op.counters[fwd], op.counters[bwd]) == (before[fwd] + 1, before[bwd] + 1)
    return y.detach(), {n: t.grad for n, t in leaves.items()}


def reference_grads(spec, act, x, ids, w, w1, w2, b1, b2, dy):
    """(y, {name: grad}) of the naive loop in float64, by autograd."""
    leaves = {n: t.detach().double().requires_grad_() for n, t in
              (("x", x), ("w", w), ("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)) if t is not None}
    y = reference_moe(leaves["x"], ids, leaves["w"], leaves["w1"], leaves["w2"], leaves.get("b1"),
                      leaves.get("b2"), act, spec.activation.slices, spec.intermediate)
    y.backward(dy.double())
    return y.detach(), {n: t.grad for n, t in leaves.items()}


# ---------------------------------------------------------------------------------------------------------
# T = 0: an empty batch gives an empty result
# ---------------------------------------------------------------------------------------------------------


def test_T_zero_through_the_op(path):
    # The op itself (the kernels' T=0 is tested in test_kernels): [0, H] in the spec's out dtype, no launch.
    spec, _, args = make_problem(Case(T=0, K=2, E=4, H=32, I=32, bias=True), torch.float32)
    y = run_op(path, spec, *args)
    assert y.shape == (0, 32) and y.dtype == torch.float32


def test_T_zero_through_the_training_op(path):
    # Forward and backward of an empty batch: empty dx, zero (not garbage) weight gradients.
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=0, K=2, E=4, H=32, I=32, bias=True), torch.float32)
    y, grads = train_op(path, spec, x, ids, w, w1, w2, b1, b2, torch.zeros(0, 32))
    assert y.shape == (0, 32) and grads["x"].shape == (0, 32) and grads["w"].shape == (0, 2)
    for name in ("w1", "w2", "b1", "b2"):
        assert not grads[name].any(), name


def _compile_empty_batch(options):
    torch.manual_seed(0)
    model = SimpleMoE(32, 16, num_experts=4, top_k=2).eval()
    backend = Backend({"inner": "eager", **options})
    x = torch.randn(0, 32)
    with torch.no_grad():
        before = op.counters["cpu"]
        y = torch.compile(model, backend=backend)(x)
        assert op.counters["cpu"] == before + 1  # the fused op ran (and returned the empty result)
        assert y.shape == (0, 32) and torch.equal(y, model(x))
    assert len(backend.explanation.reports[0].lowered) == 1


@pytest.mark.usefixtures("cpu_path")
def test_T_zero_through_a_compiled_model_unverified():
    # transformers' models cannot run an empty [1, 0] or [0, S] batch in eager (attention's reshape of 0
    # elements fails), so the compiled model here is examples/simple_moe.py's block on x [0, H].
    _compile_empty_batch({"verify": False})


@pytest.mark.usefixtures("cpu_path")
def test_T_zero_through_a_compiled_model():
    _compile_empty_batch({})


# ---------------------------------------------------------------------------------------------------------
# Duplicated expert ids within a token
# ---------------------------------------------------------------------------------------------------------


def duplicated_ids_problem(dtype=torch.float32):
    """Tokens that name one expert in two or all three of their slots. Defined behaviour: every slot is its own
    (token, expert) pair, y[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) — what eager grouped_mm, the eager loop
    and the naive reference all compute (a router that repeats an expert gets it counted once per slot)."""
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=9, K=3, E=4, H=32, I=32, bias=True), dtype)
    ids[0::3, 1] = ids[0::3, 0]  # slots 0 and 1 equal
    ids[1::3] = 2  # all three slots on expert 2
    return spec, act, (x, ids, w, w1, w2, b1, b2)


def transformers_experts(w1, w2, implementation: str):
    """transformers' Qwen3-MoE experts (SwiGLU over [gate; up], no biases) holding w1, w2."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, N1, H = w1.shape
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=N1 // 2, num_experts=E,
                                         num_experts_per_tok=2)
    config._experts_implementation = implementation
    experts = Qwen3MoeSparseMoeBlock(config).experts
    experts.gate_up_proj.data, experts.down_proj.data = w1, w2
    return experts


def test_duplicated_expert_ids_count_once_per_slot(path):
    spec, act, (x, ids, w, w1, w2, b1, b2) = duplicated_ids_problem()
    spec = MoESpec(**{**spec.__dict__, "w1_bias": False, "w2_bias": False})
    y = run_op(path, spec, x, ids, w, w1, w2, None, None)
    torch.testing.assert_close(y.double(), reference_moe(x, ids, w, w1, w2, None, None, act, spec.activation.slices,
                                                         32), **TOLERANCES[torch.float32])
    with torch.no_grad():
        for implementation in ("eager", "grouped_mm"):  # transformers' own experts agree: one pair per slot
            eager = transformers_experts(w1, w2, implementation)(x, ids, w)
            torch.testing.assert_close(y, eager, atol=1e-5, rtol=1e-5, msg=implementation)


def test_duplicated_expert_ids_gradients(path):
    # Each slot gets its own routing-weight gradient; the expert's weight gradient sums over all its slots.
    spec, act, (x, ids, w, w1, w2, b1, b2) = duplicated_ids_problem()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y, grads = train_op(path, spec, x, ids, w, w1, w2, b1, b2, dy)
    y_ref, ref = reference_grads(spec, act, x, ids, w, w1, w2, b1, b2, dy)
    assert rel_err(y, y_ref) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref[name]) <= 1e-5, name


# ---------------------------------------------------------------------------------------------------------
# NaN / Inf in x propagate exactly as eager
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_in_x_propagate_as_eager(path):
    # A non-finite value in x[t] poisons token t's rows only (every GEMM row and the combine are per token);
    # masked tile rows load 0, so the NaN reaches no other token of the same expert tile.
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=20, K=2, E=4, H=32, I=32), torch.float32)
    x = x.clone()
    x[1, 3] = float("nan")
    x[6, 0] = float("inf")
    x[11, 5] = -float("inf")
    args = (x, ids, w, w1, w2, b1, b2)
    y = run_op(path, spec, *args).double()
    ref = reference_moe(*args, act, spec.activation.slices, 32)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    poisoned = ~ref.isfinite().all(dim=1)
    assert poisoned.tolist() == [t in (1, 6, 11) for t in range(20)]
    torch.testing.assert_close(y[~poisoned], ref[~poisoned], **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------------------
# Determinism where atomics would bite: every pair on one expert, many tiles, forward and backward
# ---------------------------------------------------------------------------------------------------------


def test_bitwise_deterministic_forward_and_gradients(path):
    spec, _, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=40, K=2, E=4, H=32, I=32, bias=True,
                                                             ids="all_on_0"), torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y1, g1 = train_op(path, spec, x, ids, w, w1, w2, b1, b2, dy)
    y2, g2 = train_op(path, spec, x, ids, w, w1, w2, b1, b2, dy)
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    assert torch.equal(run_op(path, spec, x, ids, w, w1, w2, b1, b2), run_op(path, spec, x, ids, w, w1, w2, b1, b2))


# ---------------------------------------------------------------------------------------------------------
# 64-bit indexing
# ---------------------------------------------------------------------------------------------------------


ROW_STRIDE = 2**30  # elements; rows 0, 1, 2 of x sit at offsets 0, 2**30, 2**31: the last one overflows int32


def test_large_strided_views(path):
    # x's third row and w1's second expert lie 2**31 elements (4 GiB of fp16) past their base pointer: the
    # kernels must form row · stride in 64 bits. The storages are torch.empty, so only the touched pages are
    # ever backed by memory (~10 KiB resident, 8 GiB virtual).
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=3, K=2, E=2, H=32, I=32), torch.float16)
    x_big = torch.empty(2 * ROW_STRIDE + 32, dtype=torch.float16).as_strided((3, 32), (ROW_STRIDE, 1))
    x_big.copy_(x)
    w1_big = torch.empty(2 * ROW_STRIDE + w1[0].numel(), dtype=torch.float16)
    w1_big = w1_big.as_strided(w1.shape, (2 * ROW_STRIDE, w1.stride(1), 1))
    w1_big.copy_(w1)
    y = run_op(path, spec, x_big, ids, w, w1_big, w2, b1, b2)
    assert_matches_reference(y, torch.float16, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, 32)


# Every argument that scales a row (or expert) index into an address, per kernel `moe_forward` launches.
ROW_STRIDES = {
    "up_gemm": ("stride_am", "stride_we", "stride_wn", "stride_be", "stride_cm", "stride_hm"),
    "down_gemm": ("stride_am", "stride_we", "stride_wn", "stride_be", "stride_cm"),
    "combine": ("stride_ym", "stride_wt", "stride_ot"),
}

TTIR_SCRIPT = r'''
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") != "1"
import triton
from triton.backends.compiler import GPUTarget
from moefuse.kernels.codegen import load_activation
from moefuse.kernels.moe import kernel_sources
from moefuse.spec import Activation, MoESpec

spec = MoESpec(8, 2, 128, 128, 256, Activation("silu(x0)*x1", ((0, 1), (128, 1))), "float16", "float16", True, True)
wanted = set(sys.argv[1:])
out = {}
for src in kernel_sources(spec, load_activation(spec.activation.expr, 2), save_h=True):
    if src.name in wanted:
        kernel = triton.compile(src.ast_source(), target=GPUTarget("cuda", 90, 32), options=src.options)
        out[src.name] = kernel.asm["ttir"]
print(json.dumps(out))
'''


def test_generated_code_widens_row_strides_to_64_bits(tmp_path):
    """Compile-only (sm_90, fp16, no GPU needed): in the TTIR of the up GEMM (with H stored), the down GEMM and
    the combine, every row stride is sign-extended to i64 before it multiplies a row index, so T·K·H and
    E·N1·H past 2**31 address correctly."""
    script = tmp_path / "ttir.py"  # a file, not `-c`: triton.jit reads the source of what it compiles
    script.write_text(TTIR_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["MOEFUSE_CACHE_DIR"] = str(tmp_path / "moefuse")
    proc = subprocess.run([sys.executable, str(script), *ROW_STRIDES], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ttir = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(ttir) == set(ROW_STRIDES)
    for kernel, strides in ROW_STRIDES.items():
        for stride in strides:
            assert f"arith.extsi %{stride} : i32 to i64" in ttir[kernel], f"{kernel}: {stride} stays 32-bit"


# ---------------------------------------------------------------------------------------------------------
# Bad input at the API
# ---------------------------------------------------------------------------------------------------------


def test_meta_tensors_give_shapes_without_running(path):
    # meta is shape inference, not a device to compute on: the op's fake implementation answers, no path runs.
    # (A mix of meta and CPU tensors dispatches to the fake too, so "another device" cannot be built here; the
    # Triton path's device check is kernels.moe.check_layer_inputs.)
    spec, _, args = make_problem(Case(T=5, K=2, E=4, H=32, I=32, bias=True), torch.float16)
    before = dict(op.counters)
    y = op.moe_call(spec, *(a.to("meta") for a in args))
    assert y.device.type == "meta" and y.shape == (5, 32) and y.dtype == torch.float16
    assert op.counters == before


def test_kernels_on_a_cpu_tensor_without_the_interpreter_name_the_fix(monkeypatch):
    # The op routes CPU tensors to its CPU path; the Triton kernel API itself refuses them with the two ways out.
    from moefuse.kernels.codegen import load_activation
    from moefuse.kernels.moe import moe_forward

    spec, _, args = make_problem(Case(T=5, K=2, E=4, H=32, I=32), torch.float32)
    activation = load_activation(spec.activation.expr, spec.activation.num_inputs)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"x: the Triton kernels need a CUDA tensor \(or TRITON_INTERPRET=1\), "
                       r"got device cpu"):
        moe_forward(spec, *args, activation=activation)


MISSHAPED = {
    # name: (argument index in moe_call after spec, replacement, message)
    "w1_short_hidden": (3, lambda a: a[..., :16], r"w1: expected shape \(4, 64, 32\), got \(4, 64, 16\)"),
    "w2_wrong_intermediate": (4, lambda a: a[..., :16], r"w2: expected shape \(4, 32, 32\), got \(4, 32, 16\)"),
    "w1_missing_expert": (3, lambda a: a[:3], r"w1: expected shape \(4, 64, 32\), got \(3, 64, 32\)"),
    "x_wrong_hidden": (0, lambda a: a[:, :16], r"x: expected shape \(5, 32\), got \(5, 16\)"),
    "topk_ids_wrong_k": (1, lambda a: a[:, :1], r"topk_ids: expected shape \(5, 2\), got \(5, 1\)"),
}


def _misshaped_call(name):
    index, change, message = MISSHAPED[name]
    spec, _, args = make_problem(Case(T=5, K=2, E=4, H=32, I=32), torch.float32)
    args = list(args)
    args[index] = change(args[index])
    with pytest.raises(ValueError, match=message):
        op.moe_call(spec, *args)


@pytest.mark.parametrize("name", list(MISSHAPED))
def test_misshaped_inputs_name_tensor_and_shapes_interpreter(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _misshaped_call(name)


@pytest.mark.parametrize("name", list(MISSHAPED))
def test_misshaped_inputs_name_tensor_and_shapes_cpu(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _misshaped_call(name)
