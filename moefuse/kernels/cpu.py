"""The CPU kernels: C++ generated per layer from its spec (`cpu_moe.cpp` plus the layer's constants and its
activation printed by `codegen.c_source`), compiled and cached by Inductor's `CppCodeCache` (the compiler and
flags Inductor uses for its own CPU kernels, -march=native, OpenMP from torch's runtime) and called through
ctypes.

`unavailable(spec, x, w1, w2, w3, out_dtype)` says why a call cannot take this path (None when it can); the
runtime (`moefuse.runtime.cpu`) then runs its torch plan and the report says why. The kernels take fp32 or bf16
x and weights of that dtype, each weight with a unit stride along its `in` dim ([E, out, in] rows, read as they
are) or along its `out` dim ([E, in, out] storage, as GPT-OSS and torchtitan keep it: read through a packed
panel). Math is fp32; the result is fp32 or x's dtype.

Workspaces (routing arrays, A, the pair-ordered down-projection rows) are one byte buffer per thread, grown
on demand and reused, so a warm call allocates only its outputs (y, and H when training).

MOEFUSE_CPU_KERNELS=0 in the environment turns the path off (the torch plan runs, with that reason).
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

from moefuse.errors import InputError
from moefuse.kernels.codegen import c_source
from moefuse.spec import MoESpec

__all__ = ["unavailable", "backward_unavailable", "describe", "layer_source", "library", "forward", "backward", "isa"]

_SOURCE = Path(__file__).with_name("cpu_moe.cpp")
_DTYPES = (torch.float32, torch.bfloat16)
# In fp32 an expert with at most this many rows takes the dot-product form (weights streamed in place, re-read
# from cache per 6-row group); more take the packed panel, whose packing pays off from about this many rows
# (measured at the benchmarks/cpu.py shapes: 16 / 32 / 64 gave 11.7 / 11.0 / 11.0 ms at T=64 fp32). bf16 with
# vdpbf16ps keeps the dot form at any row count: it measured 15–20 % faster than its packed panel at prefill.
DOT_ROWS = 32
_ISA = {0: "portable vector code (no AVX-512)", 1: "AVX-512", 2: "AVX-512 with vdpbf16ps"}


class _Unbuildable(RuntimeError):
    """The C++ could not be compiled or loaded here (no compiler, or it failed)."""


def layer_source(spec: MoESpec, dtype: torch.dtype, portable: bool = False) -> str:
    """The complete C++ of `spec`'s kernels for x and weights of `dtype`; `portable` builds the GCC-vector
    code even where AVX-512 exists (tests run both)."""
    (off0, step0), *rest = spec.activation.slices
    off1, step1 = rest[0] if rest else (0, 0)
    layer = "\n".join([
        f"// Layer: hidden {spec.hidden}, intermediate {spec.intermediate}, up rows {spec.up_rows}, {dtype}",
        f"#define MF_BF16 {int(dtype == torch.bfloat16)}",
        f"static constexpr int64_t HID = {spec.hidden};",
        f"static constexpr int64_t INTER = {spec.intermediate};",
        f"static constexpr int64_t UPROWS = {spec.up_rows};",
        f"static constexpr int NV = {spec.activation.num_inputs};",
        f"static constexpr int DOT_ROWS = {DOT_ROWS};",
        f"static constexpr int64_t OFF0 = {off0}, STEP0 = {step0}, OFF1 = {off1}, STEP1 = {step1};",
        c_source(spec.activation.expr, spec.activation.num_inputs),
    ])
    text = _SOURCE.read_text()
    if portable:  # the ISA switch is read before the layer's block: define it first
        text = "#define MOEFUSE_PORTABLE 1\n" + text
    return text.replace("// @LAYER@", layer, 1)


_I, _P = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "mf_workspace_bytes": [_I, _I, _I, _I],
    "mf_isa": [],
    "mf_eval_act": [_I, _P, _P, _P, _P, _P],
    "mf_forward": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _I, _P,
                   _P, _I],
    "mf_backward": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P,
                    _P, _P, _P, _P, _P, _P, _P, _I],
}


@functools.lru_cache(maxsize=None)
def _load(source: str):
    try:
        from torch._inductor.codecache import CppCodeCache

        lib = CppCodeCache.load(source)
    except Exception as e:  # noqa: BLE001 - any failure means "no compiled kernels here", with its reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _Unbuildable(f"the C++ kernels did not build ({type(e).__name__}: {first[:200]})") from e
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int64
    return lib


def library(spec: MoESpec, dtype: torch.dtype, portable: bool = False):
    """The loaded kernels of `spec` for `dtype` (compiled on first use, then from Inductor's cache; printing the
    source is memoised too, so a warm call costs a dictionary look-up)."""
    a = spec.activation
    lib = _library(spec.hidden, spec.intermediate, spec.up_rows, a.expr, a.slices, dtype, portable)
    if isinstance(lib, _Unbuildable):
        raise lib
    return lib


@functools.lru_cache(maxsize=None)
def _library(hidden, intermediate, up_rows, expr, slices, dtype, portable):
    """The library, or the `_Unbuildable` error its build raised: a failure is remembered too, so a machine
    without a compiler pays for one failed build per layer, not one per call."""
    from moefuse.spec import Activation

    layer = MoESpec(num_experts=1, top_k=1, hidden=hidden, intermediate=intermediate, up_rows=up_rows,
                    activation=Activation(expr, slices), dtype=str(dtype).removeprefix("torch."), out_dtype="float32")
    try:
        return _load(layer_source(layer, dtype, portable))
    except _Unbuildable as e:
        return e


def isa(spec: MoESpec, dtype: torch.dtype) -> str:
    """What the kernels of `spec` run on this machine, in words (builds them)."""
    return _ISA[library(spec, dtype).mf_isa()]


def describe(spec: MoESpec) -> list[str]:
    """What runs `spec` on the CPU, for the report: the generated kernels (and the ISA they were built for)
    or the torch plan and why."""
    dtype = getattr(torch, spec.dtype)
    probe = torch.empty((0, spec.hidden), dtype=dtype)
    w = torch.empty((spec.num_experts, 1, 1), dtype=dtype)
    why = unavailable(spec, probe, w, w, None, getattr(torch, spec.out_dtype))
    if why is not None:
        return [f"cpu: torch plan (grouped_mm over the expert-sorted rows, fp32 activation and combine): {why}"]
    return [
        f"cpu: generated C++ ({isa(spec, dtype)}, OpenMP over (expert, column block) items)",
        f"cpu up-projection: x rows gathered in the loads, weights streamed in place "
        + ("" if isa(spec, dtype) == _ISA[2] and dtype == torch.bfloat16 else
           f"(≤ {DOT_ROWS} rows per expert) or through a packed panel ")
        + f"with the epilogue act = {spec.activation.expr} printed from the spec",
        "cpu down-projection into pair order, then a fixed-order fp32 combine per token (no atomics)",
    ]


def eval_activation(spec: MoESpec, x0: torch.Tensor, x1: torch.Tensor | None = None):
    """(act, ∂act/∂x0, ∂act/∂x1) of the spec's printed C activation at fp32 points (x1 ignored with one input):
    what the kernels' epilogues compute, for tests."""
    lib = library(spec, torch.float32)
    x0 = x0.to(torch.float32).contiguous()
    x1 = (x1 if x1 is not None else torch.zeros_like(x0)).to(torch.float32).contiguous()
    out = [torch.empty_like(x0) for _ in range(3)]
    lib.mf_eval_act(x0.numel(), x0.data_ptr(), x1.data_ptr(), *(o.data_ptr() for o in out))
    return tuple(out)


def _in_stride(w: torch.Tensor) -> int | None:
    """The stride along `in` the kernels read `w` [E, out, in] with: 1 for rows of [E, out, in] storage, the
    `in` stride for [E, in, out] storage (unit stride along out), None for other layouts."""
    if w.shape[2] <= 1 or w.stride(2) == 1:
        return 1
    if w.shape[1] <= 1 or w.stride(1) == 1:
        return w.stride(2)
    return None


def unavailable(spec: MoESpec, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
                out_dtype: torch.dtype) -> str | None:
    """Why this call cannot run on the generated kernels, or None when it can (compiling them if needed)."""
    if os.environ.get("MOEFUSE_CPU_KERNELS", "1") == "0":
        return "MOEFUSE_CPU_KERNELS=0"
    if x.device.type != "cpu":
        return f"x is on {x.device}"
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; the C++ kernels take float32 and bfloat16"
    weights = [w1, w2] + ([w3] if w3 is not None else [])
    if any(w.dtype != x.dtype for w in weights):
        return f"weights of {sorted({str(w.dtype) for w in weights})} with x of {x.dtype}"
    if out_dtype not in (torch.float32, x.dtype):
        return f"output dtype {out_dtype}"
    if any(_in_stride(w) is None for w in weights):
        return "a weight has no unit stride along either matrix dim"
    if w3 is not None and _in_stride(w3) != _in_stride(w1):
        return "w1 and w3 are laid out differently"
    try:
        library(spec, x.dtype)
    except _Unbuildable as e:
        return str(e)
    return None


# Calls that ran on the generated kernels, so tests can assert the path really ran (the runtime's counters in
# `moefuse.runtime.op` count the op, whichever path it took).
counters = {"forward": 0, "backward": 0}

_local = threading.local()


def _workspace(nbytes: int) -> torch.Tensor:
    """This thread's workspace, at least `nbytes` (grown by half again when too small, never shrunk)."""
    ws = getattr(_local, "ws", None)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, int(1.5 * (ws.numel() if ws is not None else 0)), 64), dtype=torch.uint8)
        _local.ws = ws
    return ws


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _bias(b: torch.Tensor | None) -> torch.Tensor | None:
    return b.detach().to(torch.float32).contiguous() if b is not None else None


def _pair_tensors(expert: torch.Tensor, weight: torch.Tensor, token: torch.Tensor | None):
    """expert [S] int64, weight [S] fp32 and token [S] int64 (or None: p // top_k), contiguous, as the kernels
    read them."""
    return (expert.reshape(-1).to(torch.int64).contiguous(), weight.detach().reshape(-1).to(torch.float32).contiguous(),
            token.to(torch.int64).contiguous() if token is not None else None)


def _split(spec: MoESpec, w1: torch.Tensor, w3: torch.Tensor | None) -> int:
    """The row of the virtual up-projection [w1; w3] where w3 starts (all of them without w3)."""
    return w1.shape[1] if w3 is not None else spec.up_rows


def _weight_args(spec: MoESpec, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None) -> tuple:
    """The weights as the kernels take them: each as (pointer, expert stride, row stride) with w1's and w2's `in`
    stride (w3 shares w1's), and w3's first row in the virtual [w1; w3]."""
    return (w1.data_ptr(), w1.stride(0), w1.stride(1), _in_stride(w1),
            _ptr(w3), w3.stride(0) if w3 is not None else 0, w3.stride(1) if w3 is not None else 0,
            _split(spec, w1, w3), w2.data_ptr(), w2.stride(0), w2.stride(1), _in_stride(w2))


def forward(spec: MoESpec, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, token: torch.Tensor | None,
            top_k: int, w1, w2, b1, b2, w3, save_h: bool, out_dtype: torch.dtype):
    """(y [T, H], h [S, N1] or None) of the layer on pairs p with expert[p], weight[p] and token token[p] (None:
    p // top_k). Call only when `unavailable` said None."""
    lib = library(spec, x.dtype)
    T, S, E = x.shape[0], expert.numel(), spec.num_experts
    x = x.detach().contiguous()
    expert, weight, token = _pair_tensors(expert, weight, token)
    if token is not None and S:  # the kernels index x with it: a bad token must not reach them
        bad = (expert >= 0) & (expert < E) & ((token < 0) | (token >= T))
        if bool(bad.any()):
            p = int(bad.nonzero()[0, 0])
            raise InputError(f"pair_token: pair {p} (expert {int(expert[p])}) names token {int(token[p])}, "
                             f"outside [0, {T})")
    b1, b2 = _bias(b1), _bias(b2)
    y = torch.empty((T, spec.hidden), dtype=out_dtype)
    h = torch.empty((S, spec.up_rows), dtype=x.dtype) if save_h else None
    ws = _workspace(lib.mf_workspace_bytes(T, S, E, 0))
    counters["forward"] += 1
    lib.mf_forward(
        T, S, E, top_k, x.data_ptr(), expert.data_ptr(), _ptr(token), weight.data_ptr(),
        *_weight_args(spec, w1, w2, w3), _ptr(b1), _ptr(b2), y.data_ptr(), int(out_dtype == torch.float32), _ptr(h), ws.data_ptr(),
        torch.get_num_threads(),
    )
    return y, h


def backward_unavailable(spec: MoESpec, x: torch.Tensor, w1, w2, w3) -> str | None:
    """Why the backward of this call cannot run on the generated kernels, or None."""
    why = unavailable(spec, x, w1, w2, w3, x.dtype)
    if why is None and any(_in_stride(w) != 1 for w in (w1, w2, w3) if w is not None):
        why = "the backward kernels read weights stored [E, out, in] only"
    return why


def backward(spec: MoESpec, dy: torch.Tensor, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
             token: torch.Tensor | None, top_k: int, w1, w2, b1, b2, h: torch.Tensor, w3):
    """(dx, dweight [S] fp32, dw1, dw2, db1, db2, dw3) of `forward` given dy [T, H] and its h. The weight
    gradients have the weights' dtype, contiguous [E, out, in]; db1/db2 (fp32) None without biases. Call only
    when `backward_unavailable` said None."""
    lib = library(spec, x.dtype)
    T, S, E = x.shape[0], expert.numel(), spec.num_experts
    dtype = x.dtype
    # fp32 copies of the [T, H] activations, read once per expert row: the GEMMs then broadcast and stream them
    # without widening (the weights, read once, are widened in the loads)
    x = x.detach().to(torch.float32).contiguous()
    dy = dy.detach().to(torch.float32).contiguous()
    h = h.detach().to(dtype).contiguous()
    expert, weight, token = _pair_tensors(expert, weight, token)
    split = _split(spec, w1, w3)
    dx = torch.empty_like(x, dtype=dtype)
    dpw = torch.empty(S, dtype=torch.float32)
    dw1 = torch.empty((E, split, spec.hidden), dtype=dtype)
    dw3 = torch.empty((E, spec.up_rows - split, spec.hidden), dtype=dtype) if w3 is not None else None
    dw2 = torch.empty((E, spec.hidden, spec.intermediate), dtype=dtype)
    db1 = torch.empty((E, spec.up_rows), dtype=torch.float32) if b1 is not None else None
    db2 = torch.empty((E, spec.hidden), dtype=torch.float32) if b2 is not None else None
    b2 = _bias(b2)
    ws = _workspace(lib.mf_workspace_bytes(T, S, E, 1))
    counters["backward"] += 1
    status = lib.mf_backward(
        T, S, E, top_k, dy.data_ptr(), x.data_ptr(), expert.data_ptr(), _ptr(token), weight.data_ptr(),
        *_weight_args(spec, w1, w2, w3), _ptr(b2), h.data_ptr(), dx.data_ptr(), dpw.data_ptr(), dw1.data_ptr(), _ptr(dw3), dw2.data_ptr(),
        _ptr(db1), _ptr(db2), ws.data_ptr(), torch.get_num_threads(),
    )
    if status < 0:
        raise RuntimeError("moefuse CPU backward kernel refused the weight layout")  # backward_unavailable checks it
    return dx, dpw, dw1, dw2, db1, db2, dw3
