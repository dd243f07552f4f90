"""The test-time shim that makes Triton's interpreter compute bf16 like a GPU (`moefuse.testing.
install_interpreter_bf16_dot`, installed by conftest): its bit conversions are exact (every bf16 pattern to
fp32; fp32 and fp16 to bf16 rounded to nearest even, bit for bit torch's), a bf16 dot through it equals
torch's — bit for bit where fp32 accumulation is exact, within fp32's accumulation bound elsewhere — while the
interpreter's own dot and casts do not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from moefuse.testing import bf16_bits_to_f32, install_interpreter_bf16_dot, uninstall_interpreter_bf16_dot


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """c [M, N] fp32 = a [M, K] · b [K, N] (both bf16 or both fp32), one program, fp32 accumulator."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.dot(a, b, tl.zeros((M, N), tl.float32), input_precision="ieee")
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    """dst [N] = src [N] cast to dst's element type."""
    r = tl.arange(0, N)
    tl.store(dst_ptr + r, tl.load(src_ptr + r).to(dst_ptr.dtype.element_ty))


def cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    dst = torch.empty(src.shape, dtype=dtype)
    _cast_kernel[(1,)](src, dst, src.numel())
    return dst


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, a.shape[0], b.shape[1], a.shape[1])
    return c


def test_bit_conversion_is_exact_on_every_bf16_pattern():
    """All 65,536 bf16 bit patterns (±0, subnormals, ±inf, NaNs with their payloads): the shim's fp32 has the
    bits torch's bf16 → fp32 conversion gives."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = torch.from_numpy(bf16_bits_to_f32(bits).view(np.int32).copy())
    theirs = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().view(torch.int32)
    assert torch.equal(ours, theirs)


def fp32_patterns(n: int = 1 << 16) -> torch.Tensor:
    """n fp32 values: random bit patterns (every exponent, subnormals, infinities, NaNs) with the rounding edge
    cases — exact ties to even and odd, one ulp either side of a tie, the largest finite bf16 and above."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), 1 << 31, (n - 16,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7F7FFF, 0x7F7F8000, 0x7F800000,
                          0xFF800000, 0x7FC00000, 0x00000001, 0x80008000, 0x00018000, 0, 0x80000000, 0x3F800000,
                          0x477FE000], dtype=torch.int64).to(torch.int32)
    return torch.cat([bits, edges]).view(torch.float32)


def test_casts_to_bf16_round_like_torch():
    """fp32 → bf16 and fp16 → bf16 through a kernel's `.to(tl.bfloat16)`: torch's bits, NaN for NaN."""
    for src in (fp32_patterns(), fp32_patterns().to(torch.float16)):
        got, want = cast(src, torch.bfloat16), src.to(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), src.dtype


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # bf16 beyond fp16: inf
def test_casts_from_bf16_are_exact():
    bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for dtype in (torch.float32, torch.float16):
        got, want = cast(bf16, dtype), bf16.to(dtype)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), dtype


def test_shim_is_installed_once():
    assert install_interpreter_bf16_dot() is False  # conftest installed it


@pytest.mark.parametrize("M,N,K", [(16, 16, 16), (32, 16, 64)])
def test_bf16_dot_equals_torch(M, N, K):
    """Small integers: every product and partial sum is exact in fp32, so any summation order gives the float64
    result — bit equality with it. Normal draws: products exact in fp32 (8 × 8 significand bits), so the
    only error is fp32 accumulation over K terms, bounded by γ_K = K·u/(1 − K·u), u = 2⁻²⁴, times Σ|a||b|."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (M, K), generator=g).to(torch.bfloat16)
    b = torch.randint(-8, 9, (K, N), generator=g).to(torch.bfloat16)
    assert torch.equal(dot(a, b), (a.double() @ b.double()).float())
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(K, N, generator=g).to(torch.bfloat16)
    u = 2.0**-24
    bound = K * u / (1 - K * u) * (a.double().abs() @ b.double().abs())
    assert ((dot(a, b).double() - a.double() @ b.double()).abs() <= bound).all()
    assert torch.equal(dot(a.float(), b.float()), dot(a, b))  # the shim's bf16 dot is the fp32 dot of its values


def test_interpreter_dot_without_the_shim_multiplies_bits():
    """Why the shim exists: without it the interpreter's bf16 dot is far off (it multiplies the uint16 bit
    patterns). When this fails, Triton fixed issue 11584 and the shim can go."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    x = torch.full((16,), 1.0 + 2**-8 + 2**-12)  # one bf16 ulp above 1 to nearest, 1.0 truncated
    uninstall_interpreter_bf16_dot()
    try:
        raw, raw_cast = dot(a, b), cast(x, torch.bfloat16)
    finally:
        install_interpreter_bf16_dot()
    want = a.float() @ b.float()
    assert (raw - want).abs().max() > 1.0, "Triton's interpreter now computes bf16 dots: remove that part of the shim"
    assert (raw_cast == 1.0).all() and (x.to(torch.bfloat16) > 1.0).all(), \
        "Triton's interpreter now rounds fp32 → bf16 to nearest: remove that part of the shim"
