"""Compile every forward and backward kernel for sm_80 and sm_90 on a machine without a GPU, and check the
generated code.

The compile runs in a subprocess: with TRITON_INTERPRET=1 (set by conftest.py for the interpreter tests)
`triton.jit` returns interpreter functions, which `ASTSource` cannot compile, and the variable is read when a
kernel is defined, so it has to be absent from the start of the process that imports the kernels.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAPABILITIES = (80, 90)
GEMMS = ("up_gemm", "up_gemm_plain", "up_gemm_save_h", "down_gemm")
# The backward's GEMMs: the activation-gradient GEMM (SwiGLU, a one-input relu, GPT-OSS's clamp GLU: the largest
# epilogue), the varlen-K weight gradients with and without the fused bias pass, and dX.
BACKWARD_GEMMS = ("activation_backward", "activation_backward_plain", "activation_backward_gpt_oss",
                  "weight_grad_dw2", "weight_grad_dw1", "weight_grad_dw2_nobias", "weight_grad_dw1_nobias", "dx_gemm")
BACKWARD_OTHERS = ("router_grad", "router_grad_nobias", "combine_unweighted")
# Per-block shared memory a kernel may use (the opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

assert os.environ.get("TRITON_INTERPRET") != "1"
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget

from moefuse.kernels.backward import backward_kernel_sources
from moefuse.kernels.codegen import load_activation_grad
from moefuse.kernels.moe import kernel_sources
from moefuse.spec import Activation, MoESpec


@triton.jit
def silu_mul(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def relu(x):
    return tl.maximum(x, 0.0)


def spill_bytes(ptx, cap):
    """Spill stores + loads reported by `ptxas -v` (the ptxas that ships with Triton)."""
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr))


H = I = 128
GPT_OSS = "(clamp(x1, -7, 7) + 1)*clamp(x0, max=7)*sigmoid(1.702*clamp(x0, max=7))"
# The backward specialisations a no-bias layer gets, under names of their own
NO_BIAS = {"activation_backward": "activation_backward_plain", "router_grad": "router_grad_nobias",
           "weight_grad_dw2": "weight_grad_dw2_nobias", "weight_grad_dw1": "weight_grad_dw1_nobias"}
jobs = []  # (name, dtype, source): compiled for each capability by a pool of forked workers
for dtype in ("float16", "bfloat16", "float32"):
    glu = MoESpec(8, 2, H, I, 2 * I, Activation("silu(x0)*x1", ((0, 1), (I, 1))), dtype, dtype, True, True)
    plain = MoESpec(8, 2, H, I, I, Activation("relu(x0)", ((0, 1),)), dtype, "float32")
    gpt_oss = MoESpec(8, 2, H, I, 2 * I, Activation(GPT_OSS, ((0, 2), (1, 2))), dtype, dtype, True, True)
    sources = [(s.name, s) for s in kernel_sources(glu, silu_mul) if not s.name.startswith("routing")]
    sources += [("up_gemm_plain", s) for s in kernel_sources(plain, relu) if s.name == "up_gemm"]
    sources += [("up_gemm_save_h", s) for s in kernel_sources(glu, silu_mul, save_h=True) if s.name == "up_gemm"]
    sources += [(s.name, s) for s in backward_kernel_sources(glu, load_activation_grad(glu.activation.expr, 2))]
    sources += [(NO_BIAS[s.name], s) for s in backward_kernel_sources(plain, load_activation_grad("relu(x0)", 1))
                if s.name in NO_BIAS]
    sources += [("activation_backward_gpt_oss", s)
                for s in backward_kernel_sources(gpt_oss, load_activation_grad(GPT_OSS, 2))
                if s.name == "activation_backward"]
    if dtype == "float16":  # the routing kernels have no float operand: once per ids dtype and E
        for E, ids_dtype in ((8, torch.int32), (8, torch.int64), (256, torch.int32)):
            spec = MoESpec(E, 2, H, I, 2 * I, glu.activation, dtype, dtype)
            sources += [(s.name, s) for s in kernel_sources(spec, silu_mul, ids_dtype=ids_dtype)
                        if s.name.startswith("routing")]
    jobs += [(name, dtype, src, cap) for cap in (80, 90) for name, src in sources]


def compile_one(i):
    name, dtype, src, cap = jobs[i]
    kernel = triton.compile(src.ast_source(), target=GPUTarget("cuda", cap, 32), options=src.options)
    ptx = kernel.asm.get("ptx", "")
    return dict(
        kernel=name, dtype=dtype, cap=cap,
        ids=src.signature.get("topk_ids_ptr"), block_e=src.constexprs.get("BLOCK_E"),
        ptx_bytes=len(ptx), wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
        cp_async="cp.async" in ptx, shared=kernel.metadata.shared, spill_bytes=spill_bytes(ptx, cap),
        w_tma=src.constexprs.get("W_TMA"), tma_load="cp.async.bulk.tensor" in ptx,  # TMA: a bulk tensor copy
    )


# Forked workers inherit `jobs` (jit functions do not pickle); compiles are independent and CPU-bound.
with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=get_context("fork")) as pool:
    records = list(pool.map(compile_one, range(len(jobs))))
print(json.dumps(records))
'''


def run_compile_script(tmp_path_factory, name: str, source: str) -> list[dict]:
    """Run a compile script in a subprocess without the interpreter; its last stdout line is the JSON records."""
    tmp = tmp_path_factory.mktemp(name)
    script = tmp / f"{name}.py"  # a file, not `-c`: triton.jit needs the source of the activations
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a fresh cache: the test compiles, it never reads a hit
    env["MOEFUSE_CACHE_DIR"] = str(tmp / "moefuse")  # where the generated activation gradients are written
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_compile_script(tmp_path_factory, "compile_only", SCRIPT)


def select(records, **where):
    found = [r for r in records if all(r[k] == v for k, v in where.items())]
    assert found, f"no compiled kernel matches {where}"
    return found


def test_every_kernel_compiles_to_ptx(records):
    names = {r["kernel"] for r in records}
    everything = {*GEMMS, "combine", *BACKWARD_GEMMS, *BACKWARD_OTHERS}
    assert names == {"routing_histogram", "routing_scan", "routing_scatter", *everything}
    for cap in CAPABILITIES:
        for dtype in ("float16", "bfloat16", "float32"):
            assert {r["kernel"] for r in select(records, cap=cap, dtype=dtype)} >= everything
        scatter = select(records, cap=cap, kernel="routing_scatter")
        assert {r["ids"] for r in scatter} == {"*i32", "*i64"}
        assert {r["block_e"] for r in scatter} == {16, 512}  # E = 8 and E = 256 (DeepSeek-V3's)
    for r in records:
        assert r["ptx_bytes"] > 0, r


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kernel", GEMMS + BACKWARD_GEMMS)
def test_gemms_use_tensor_cores(records, kernel, dtype):
    # sm_90: warpgroup MMA (the default configs have BLOCK_M=64 rows per warpgroup); sm_80: mma.sync. The varlen-K
    # weight gradients too: their transposed operand Pᵀ is an M-major wgmma operand in shared memory, which
    # wgmma supports for 16-bit types.
    (hopper,) = select(records, kernel=kernel, dtype=dtype, cap=90)
    (ampere,) = select(records, kernel=kernel, dtype=dtype, cap=80)
    assert hopper["wgmma"], hopper
    assert ampere["mma_sync"] and not ampere["wgmma"], ampere


@pytest.mark.parametrize("kernel", GEMMS + BACKWARD_GEMMS)
def test_gemms_are_software_pipelined(records, kernel):
    # num_stages > 1 only takes effect if the loads became cp.async copies into a multi-buffered ring.
    for r in select(records, kernel=kernel):
        assert r["cp_async"], r


def test_no_spills_and_shared_memory_fits(records):
    for r in records:
        assert r["spill_bytes"] == 0, r
        assert r["shared"] <= SHARED_LIMIT[r["cap"]], r


# ---------------------------------------------------------------------------------------------------------
# Flat pairs (`moefuse::moe_pairs`): the kernels whose code the FLAT_PAIRS switch changes, fp16, sm_80 and sm_90
# ---------------------------------------------------------------------------------------------------------

# The gathering GEMMs (x or dy rows through pair_token), the per-token combine (a loop over token_offsets)
# and the router gradient (dy rows through pair_token in the bias term). The down and dX GEMMs gather nothing:
# FLAT_PAIRS compiles to their [T, K] code, checked above; combine_unweighted is combine's loop without the
# weight load.
PAIRS_KERNELS = ("up_gemm", "combine", "activation_backward", "router_grad", "weight_grad_dw2", "weight_grad_dw1")
PAIRS_GEMMS = ("up_gemm", "activation_backward", "weight_grad_dw2", "weight_grad_dw1")
# The same script with other jobs: its imports, helpers and compile loop, the flat-pairs specialisations.
_HEAD, _REST = SCRIPT.split("jobs = []", 1)
PAIRS_SCRIPT = _HEAD + r'''
glu = MoESpec(8, 2, H, I, 2 * I, Activation("silu(x0)*x1", ((0, 1), (I, 1))), "float16", "float16", True, True)
sources = [s for s in kernel_sources(glu, silu_mul, save_h=True, flat_pairs=True)
           + backward_kernel_sources(glu, load_activation_grad(glu.activation.expr, 2), flat_pairs=True)
           if s.name in ''' + repr(PAIRS_KERNELS) + r''']
jobs = [(s.name, "float16", s, cap) for cap in (80, 90) for s in sources]


def compile_one''' + _REST.split("def compile_one", 1)[1]


@pytest.fixture(scope="module")
def pairs_records(tmp_path_factory):
    return run_compile_script(tmp_path_factory, "compile_only_pairs", PAIRS_SCRIPT)


def test_flat_pairs_kernels_compile(pairs_records):
    # Every specialisation builds for both targets without spills; the GEMMs keep tensor cores (wgmma on sm_90,
    # mma.sync on sm_80) and their cp.async pipelines with the pair_token gather in the load.
    for cap in CAPABILITIES:
        assert {r["kernel"] for r in select(pairs_records, cap=cap)} == set(PAIRS_KERNELS)
    for r in pairs_records:
        assert r["ptx_bytes"] > 0 and r["spill_bytes"] == 0 and r["shared"] <= SHARED_LIMIT[r["cap"]], r
    for kernel in PAIRS_GEMMS:
        (hopper,) = select(pairs_records, kernel=kernel, cap=90)
        (ampere,) = select(pairs_records, kernel=kernel, cap=80)
        assert hopper["wgmma"] and hopper["cp_async"], hopper
        assert ampere["mma_sync"] and ampere["cp_async"] and not ampere["wgmma"], ampere


# ---------------------------------------------------------------------------------------------------------
# The grouped GEMM's persistent grid and TMA weight loads (`GemmConfig.persistent` / `tma`), fp16 and bf16 at the
# default tiles, sm_80 and sm_90
# ---------------------------------------------------------------------------------------------------------

SCHEDULE_SCRIPT = _HEAD + r'''
import dataclasses
from moefuse.kernels.grouped_gemm import GemmConfig
jobs = []
for dtype, variant in (("float16", "persistent"), ("float16", "persistent_tma"), ("bfloat16", "persistent_tma")):
    glu = MoESpec(8, 2, H, I, 2 * I, Activation("silu(x0)*x1", ((0, 1), (I, 1))), dtype, dtype, True, True)
    config = dataclasses.replace(GemmConfig.default(getattr(torch, dtype)), persistent=True,
                                 tma=variant == "persistent_tma")
    for cap in (80, 90):  # the sources of a launch on that GPU: the host picks TMA or pointer loads per target
        jobs += [(f"{s.name}_{variant}", dtype, s, cap)
                 for s in kernel_sources(glu, silu_mul, config, save_h=True, capability=cap) if "gemm" in s.name]


def compile_one''' + _REST.split("def compile_one", 1)[1]


@pytest.fixture(scope="module")
def schedule_records(tmp_path_factory):
    return run_compile_script(tmp_path_factory, "compile_only_schedule", SCHEDULE_SCRIPT)


def test_persistent_and_tma_gemms_compile(schedule_records):
    # Both GEMMs (the GLU up GEMM with save_h, the largest epilogue; the down GEMM) build for both targets without
    # spills, their shared memory fits, and they keep tensor cores and the cp.async pipeline of the A operand.
    assert len(schedule_records) == 12
    for r in schedule_records:
        assert r["ptx_bytes"] > 0 and r["spill_bytes"] == 0 and r["shared"] <= SHARED_LIMIT[r["cap"]], r
        assert r["cp_async"] and (r["wgmma"] if r["cap"] == 90 else r["mma_sync"] and not r["wgmma"]), r
        # sm_90 with tma: the weight tiles arrive by TMA; sm_80 (no TMA), or tma off: the host chose pointer loads.
        tma = r["cap"] == 90 and r["kernel"].endswith("_tma")
        assert r["w_tma"] == tma and r["tma_load"] == tma, r


# ---------------------------------------------------------------------------------------------------------
# Gate and up as two tensors (`MoESpec.w3`): the up GEMM with a second weight pointer (SPLIT_W; with tma, a
# second tensor descriptor) and dX with two B pointers along K (SPLIT_K), fp16 and bf16, sm_80 and sm_90
# ---------------------------------------------------------------------------------------------------------

SPLIT_SCRIPT = _HEAD + r'''
import dataclasses
from moefuse.kernels.grouped_gemm import GemmConfig
jobs = []
for dtype in ("float16", "bfloat16"):
    split = MoESpec(8, 2, H, I, 2 * I, Activation("silu(x0)*x1", ((0, 1), (I, 1))), dtype, dtype, w2_bias=True,
                    w3=True)
    tma = dataclasses.replace(GemmConfig.default(getattr(torch, dtype)), persistent=True, tma=True)
    for cap in (80, 90):
        jobs += [(f"{s.name}_split", dtype, s, cap)
                 for s in kernel_sources(split, silu_mul, save_h=True, capability=cap) if s.name == "up_gemm"]
        jobs += [(f"{s.name}_split_persistent_tma", dtype, s, cap)
                 for s in kernel_sources(split, silu_mul, tma, save_h=True, capability=cap) if s.name == "up_gemm"]
        jobs += [(f"{s.name}_split", dtype, s, cap)
                 for s in backward_kernel_sources(split, load_activation_grad(split.activation.expr, 2))
                 if s.name == "dx_gemm"]


def compile_one''' + _REST.split("def compile_one", 1)[1]


@pytest.fixture(scope="module")
def split_records(tmp_path_factory):
    return run_compile_script(tmp_path_factory, "compile_only_split", SPLIT_SCRIPT)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_split_weight_gemms_compile(split_records, dtype):
    # Each builds for both targets without spills and fits shared memory; tensor cores (wgmma on sm_90, mma.sync on
    # sm_80) and the cp.async pipeline of the A operand survive the second weight pointer.
    kernels = {"up_gemm_split", "up_gemm_split_persistent_tma", "dx_gemm_split"}
    for cap in CAPABILITIES:
        assert {r["kernel"] for r in select(split_records, cap=cap, dtype=dtype)} == kernels
    for r in select(split_records, dtype=dtype):
        assert r["ptx_bytes"] > 0 and r["spill_bytes"] == 0 and r["shared"] <= SHARED_LIMIT[r["cap"]], r
        assert r["cp_async"], r
        assert r["wgmma"] if r["cap"] == 90 else r["mma_sync"] and not r["wgmma"], r
        # sm_90 with tma: both w1 and w3 tiles by TMA (two descriptors); otherwise the pointer loads.
        tma = r["cap"] == 90 and r["kernel"].endswith("_tma")
        assert r["w_tma"] == tma and r["tma_load"] == tma, r
