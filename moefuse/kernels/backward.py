"""SonicMoE's memory-efficient backward of one MoE layer: every gradient from dy, x, the ids and the saved H.

Per sorted row r (expert e, token t, pair weight s = topk_w[t, k]); A = act(H), never stored by the forward:

  1. dA'  = gather(dy) · W2_e           varlen-M GEMM; its epilogue loads H_r, recomputes A and ∂act/∂x_j
                                        (the generated `load_activation_grad` function) and writes
       dH  [S, N1]   s·dA'·∂act/∂x_j at column OFF_j + STEP_j·n (h's layout)
       A'  [S, I]    s·A
       dS  [S, NT]   per N-tile partial row sums of dA'⊙A  (NT = cdiv(I, BLOCK_N))
  2. dtopk_w[t, k] = Σ_j dS[pair_pos[t·K + k], j] (+ ⟨dy_t, b2_e⟩)    fixed order, 0 for dropped pairs
  3. dW2_e = Σ_r dy_t(r)ᵀ A'_r,  dW1_e = Σ_r dH_rᵀ x_t(r)          varlen-K GEMMs, gather inside the load;
     db2_e = Σ_r s·dy_t(r),      db1_e = Σ_r dH_r                   fused into the same programs (*)
  4. dX    = dH · W1_e               the forward's varlen-M grouped GEMM, W = w1 viewed [E, H, N1]
     dx_t  = Σ_k dX[pair_pos[t·K + k]]  the forward's combine, unweighted

Gate and up as two tensors (`MoESpec.w3`, w1 and w3 [E, I, H]): dH keeps the layout of the virtual [w1; w3]
(step 1 is unchanged); step 3 runs the varlen-K GEMM once per tensor on its half of dH's columns, dW1_e =
Σ_r dH_r[:I]ᵀ x_t(r) and dW3_e = Σ_r dH_r[I:]ᵀ x_t(r) (a strided view of dH, no copy); step 4 is one GEMM
with two B pointers along K (SPLIT_K), dX = dH[:, :I] · W1_e + dH[:, I:] · W3_e in one fp32 accumulator.

dS rests on ⟨dy_t, Y_r⟩ = ⟨dy_t, W2_e A_r⟩ = ⟨W2_eᵀ dy_t, A_r⟩ = ⟨dA'_r, A_r⟩: the router gradient
needs neither Y nor its gradient. Memory beyond the outputs: dH [S, N1], A' [S, I] and dX [S, H] in x's dtype,
and dS (fp32, NT per row).

(*) The bias sums are a second, MMA-free pass over P = dy or dH by the programs of dW's first N-tile column,
after their main loop: no extra launch, a fixed order, and the main loop stays a pure load → MMA pipeline.
It reads dy / dH once more (S·(H + N1) elements, against the cdiv(N, BLOCK_N) reads the GEMM already makes),
and only for layers with biases.

Flat pairs (`moe_pairs_backward`, for `moe.moe_pairs_forward`) run the same launches on
`routing.flat_pairs_plan` with K = 1: s is pair_weight[p], the gathers read dy and x at row pair_token[p], dx
sums each token's pairs token_offsets[t] .. token_offsets[t+1], and dpair_weight is [S_max] (0 in unused slots).

No atomics, no host sync: every output element is written by one program that sums in a fixed order, so the
result is bit-for-bit reproducible; grids are sized by upper bounds like the forward's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moefuse.kernels.codegen import load_activation_grad
from moefuse.kernels.combine import combine
from moefuse.kernels.grouped_gemm import (
    GemmConfig,
    gemm_constexprs,
    grouped_gemm,
    grouped_gemm_kernel,
    identity,
    locate_m_tile,
    operand_rows,
    varlen_m_mainloop,
)
from moefuse.inputs import TORCH_DTYPES, check_dtype, check_layer_inputs, check_pairs_inputs, check_shape
from moefuse.kernels.moe import (
    POINTER_TYPES,
    KernelSource,
    check_triton_device,
    combine_source,
    gemm_signature,
    with_constexprs,
)
from moefuse.kernels.routing import RoutingPlan, flat_pairs_plan, routing_plan
from moefuse.spec import MoESpec

ROUTER_WARPS = 4


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def pair_weights(sorted_row, mask, sorted_pairs_ptr, topk_w_ptr, TOP_K, stride_st, stride_sk):
    """s = topk_w[t, k] of the pair t·TOP_K + k of each sorted row, fp32 (0 where masked)."""
    pair = tl.load(sorted_pairs_ptr + sorted_row, mask=mask, other=0)
    s = tl.load(topk_w_ptr + (pair // TOP_K) * stride_st + (pair % TOP_K) * stride_sk, mask=mask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def segment_rows_tile(
    ptr, sorted_row, r_mask, cols, c_mask, stride_r, stride_c, sorted_pairs_ptr, pair_token_ptr, TOP_K,
    GATHER: tl.constexpr, FLAT_PAIRS: tl.constexpr,
):
    """[len(sorted_row), len(cols)] tile of an operand at the rows of `sorted_row` (gathered by token if
    GATHER), zero where masked."""
    row = operand_rows(sorted_row, r_mask, sorted_pairs_ptr, pair_token_ptr, TOP_K, GATHER, FLAT_PAIRS)
    return tl.load(ptr + row[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=r_mask[:, None] & c_mask[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------------------
# 1. dA' = gather(dy) · W2, with the activation's backward in the epilogue
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def activation_backward_kernel(
    # Pointers
    dy_ptr,  # [T, KDIM=H] gradient of y, dtype of w, any strides; rows gathered by token
    w_ptr,  # [E, N=I, KDIM=H]: w2 viewed out × in for this product (w2.transpose(1, 2)), any strides
    h_ptr,  # [S, N1] pre-activations saved by the forward (sorted rows), fp16/bf16/fp32
    topk_w_ptr,  # [T, K] routing weights, any float dtype, any strides
    dh_ptr,  # [S, N1] out, dtype of h: column OFF_j + STEP_j·n gets s·dA'·∂act/∂x_j
    a_prime_ptr,  # [S, N=I] out, dtype of h: s·act(H)
    ds_ptr,  # [S, NT] fp32 out: column pid_n gets the row sums of dA'⊙act(H) over this program's N-tile
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32
    sorted_pairs_ptr,  # [S] int32
    pair_token_ptr,  # [S] int32/int64, token of each pair; read only if FLAT_PAIRS
    # Sizes
    N, KDIM, E, TOP_K,
    # Strides
    stride_dyt, stride_dyh,
    stride_we, stride_wn, stride_wk,
    stride_hm, stride_hn,
    stride_st, stride_sk,
    stride_dhm, stride_dhn,
    stride_apm, stride_apn,
    stride_dsm, stride_dsn,
    # Epilogue: activation input j of column n is h column OFF_j + STEP_j·n
    OFF0: tl.constexpr, STEP0: tl.constexpr,
    OFF1: tl.constexpr, STEP1: tl.constexpr,
    NUM_INPUTS: tl.constexpr,
    ACTIVATION_GRAD: tl.constexpr,  # @triton.jit (x0[, x1]) -> (act, ∂act/∂x0[, ∂act/∂x1]), fp32
    FLAT_PAIRS: tl.constexpr,  # flat pairs (`routing.flat_pairs_plan`): topk_w is [S, 1], tokens from pair_token
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(S, BLOCK_M) + E, NT). Program (i, j) owns the i-th M-tile in expert order (BLOCK_M rows of
    one expert) × N-tile j (BLOCK_N of the I columns): those tiles of A' and of dS's column j, and the
    NUM_INPUTS column sets of dH its activation inputs came from. Programs past the real tile count exit."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # ---- Locate this M-tile; dy rows are the tokens' ----
    num_tiles, expert, m_mask, sorted_row = locate_m_tile(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if pid_m >= num_tiles:
        return
    dy_row = operand_rows(sorted_row, m_mask, sorted_pairs_ptr, pair_token_ptr, TOP_K, True, FLAT_PAIRS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N

    # ---- Main loop: dA' = dy_t · W2_e (one accumulator) ----
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    da, _ = varlen_m_mainloop(dy_ptr, dy_row, m_mask, stride_dyt, stride_dyh,
                              w_expert, rn.to(tl.int64), n_mask, stride_wn, stride_wk,
                              w_expert, rn.to(tl.int64), stride_wn, stride_wk,
                              KDIM, 1, BLOCK_M, BLOCK_N, BLOCK_K, False)

    # ---- Epilogue: recompute act(H) and its partials from the saved pre-activations, in fp32 ----
    mask = m_mask[:, None] & n_mask[None, :]
    h_col0 = (OFF0 + STEP0 * rn).to(tl.int64)
    h_col1 = (OFF1 + STEP1 * rn).to(tl.int64)
    h_rows = h_ptr + sorted_row[:, None] * stride_hm
    x0 = tl.load(h_rows + h_col0[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
    if NUM_INPUTS == 2:
        x1 = tl.load(h_rows + h_col1[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        act, d0, d1 = ACTIVATION_GRAD(x0, x1)
    else:
        act, d0 = ACTIVATION_GRAD(x0)
    s = pair_weights(sorted_row, m_mask, sorted_pairs_ptr, topk_w_ptr, TOP_K, stride_st, stride_sk)

    # ---- dS partial (before any rounding), A' = s·A, dH = s·dA'·∂act/∂x_j ----
    # The where also drops act at masked columns: act(0) need not be 0 (gelu, a shifted clamp).
    ds = tl.sum(tl.where(mask, da * act, 0.0), axis=1)
    tl.store(ds_ptr + sorted_row * stride_dsm + pid_n * stride_dsn, ds, mask=m_mask)
    a_prime = s[:, None] * act
    tl.store(a_prime_ptr + sorted_row[:, None] * stride_apm + rn[None, :] * stride_apn,
             a_prime.to(a_prime_ptr.dtype.element_ty), mask=mask)
    g = s[:, None] * da
    dh_rows = dh_ptr + sorted_row[:, None] * stride_dhm
    tl.store(dh_rows + h_col0[None, :] * stride_dhn, (g * d0).to(dh_ptr.dtype.element_ty), mask=mask)
    if NUM_INPUTS == 2:
        tl.store(dh_rows + h_col1[None, :] * stride_dhn, (g * d1).to(dh_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# 2. dtopk_w: the partial sums of dS, per pair in [T, K] order
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def router_grad_kernel(
    # Pointers
    ds_ptr,  # [S, NT] fp32 partial sums of dA'⊙A (sorted rows; rows of dropped pairs are garbage)
    dy_ptr,  # [T, H] any float dtype, any strides; read only if HAS_BIAS
    b2_ptr,  # [E, H] any float dtype, any strides; read only if HAS_BIAS
    topk_ids_ptr,  # [T, K] int32 or int64, any strides; read only if HAS_BIAS
    pair_token_ptr,  # [S] int32/int64, token of each pair; read only if HAS_BIAS and FLAT_PAIRS
    pair_pos_ptr,  # [S] int32, sorted row of pair t·K + k
    offsets_ptr,  # [E + 1] int32; rows >= offsets[E] hold dropped pairs
    out_ptr,  # [T, K] out, dtype of topk_w, any strides
    # Sizes
    S, H, E, TOP_K, NT,
    # Strides
    stride_dsm, stride_dsn,
    stride_dyt, stride_dyh,
    stride_be, stride_bh,
    stride_it, stride_ik,
    stride_ot, stride_ok,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,  # add ⟨dy_t, b2_e⟩: ∂y_t/∂s includes the bias the expert output carries
    FLAT_PAIRS: tl.constexpr,  # ids and out are [S, 1] (K = 1), dy's row is pair_token[p]
    BLOCK_P: tl.constexpr,  # pairs per program
    BLOCK_J: tl.constexpr,  # partial-sum columns per step
    BLOCK_H: tl.constexpr,  # hidden columns per step of the bias term
):
    """Grid: (cdiv(S, BLOCK_P),). Program i owns pairs [i·BLOCK_P, (i+1)·BLOCK_P), i.e. those elements of
    dtopk_w; each is a sum in a fixed order (column blocks in order, then a tree within the block)."""
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pairs < S
    token = (pairs // TOP_K).to(tl.int64)
    slot = pairs % TOP_K
    pos = tl.load(pair_pos_ptr + pairs, mask=in_range, other=0).to(tl.int64)
    kept = in_range & (pos < tl.load(offsets_ptr + E))

    # ---- Σ_j dS[pos, j] ----
    acc = tl.zeros((BLOCK_P, BLOCK_J), dtype=tl.float32)
    rj = tl.arange(0, BLOCK_J)
    for j0 in range(0, NT, BLOCK_J):
        j_mask = rj < NT - j0
        acc += tl.load(ds_ptr + pos[:, None] * stride_dsm + (j0 + rj)[None, :] * stride_dsn,
                       mask=kept[:, None] & j_mask[None, :], other=0.0)
    grad = tl.sum(acc, axis=1)

    # ---- + ⟨dy_t, b2_e⟩ ----
    if HAS_BIAS:
        expert = tl.load(topk_ids_ptr + token * stride_it + slot * stride_ik, mask=kept, other=0).to(tl.int64)
        if FLAT_PAIRS:
            dy_row = tl.load(pair_token_ptr + pairs, mask=kept, other=0).to(tl.int64)
        else:
            dy_row = token
        bias_acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        rh = tl.arange(0, BLOCK_H)
        for h0 in range(0, H, BLOCK_H):
            hm = kept[:, None] & (rh < H - h0)[None, :]
            dy = tl.load(dy_ptr + dy_row[:, None] * stride_dyt + (h0 + rh)[None, :] * stride_dyh, mask=hm, other=0.0)
            b = tl.load(b2_ptr + expert[:, None] * stride_be + (h0 + rh)[None, :] * stride_bh, mask=hm, other=0.0)
            bias_acc += dy.to(tl.float32) * b.to(tl.float32)
        grad += tl.sum(bias_acc, axis=1)

    # A dropped pair gets exactly 0 (its dS row was never written).
    tl.store(out_ptr + token * stride_ot + slot * stride_ok, tl.where(kept, grad, 0.0).to(out_ptr.dtype.element_ty),
             mask=in_range)


# ---------------------------------------------------------------------------------------------------------
# 3. dW_e = Σ_r P_rᵀ Q_r over the expert's rows (varlen-K), and the bias gradient Σ_r w_r·P_r
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def weight_grad_kernel(
    # Pointers
    p_ptr,  # GATHER_P: [T, M] indexed by token; else [S, M] sorted rows. fp16/bf16/fp32, any strides
    q_ptr,  # GATHER_Q: [T, N] indexed by token; else [S, N] sorted rows. dtype of p, any strides
    c_ptr,  # [E, M, N] out, any float dtype, any strides
    topk_w_ptr,  # [T, K] any float dtype, any strides; read only if HAS_BIAS and BIAS_WEIGHTED
    bias_grad_ptr,  # [E, M] out, any float dtype, any strides; written only if HAS_BIAS
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32
    sorted_pairs_ptr,  # [S] int32
    pair_token_ptr,  # [S] int32/int64, token of each pair; read only if FLAT_PAIRS
    # Sizes
    M, N, TOP_K,
    # Strides
    stride_pr, stride_pc,
    stride_qr, stride_qc,
    stride_ce, stride_cm, stride_cn,
    stride_st, stride_sk,
    stride_be, stride_bm,
    # Specialisation
    GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # also bias_grad[e] = Σ_r w_r·P_r (programs of the first N-tile)
    BIAS_WEIGHTED: tl.constexpr,  # w_r = s of the row's pair; else 1
    FLAT_PAIRS: tl.constexpr,  # flat pairs: the gathered operand's rows are pair_token[p], topk_w is [S, 1]
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows of the segment per step
):
    """Grid: (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), E). Program (i, e) owns output tile i of expert e's C, and with
    HAS_BIAS, if its tile is in the first N-tile column, the same M-range of bias_grad[e]. It walks all of e's
    rows in order (an expert without rows gets zeros): no split-K, no atomics, a fixed summation order.

    dW2: P = dy (gathered, M = H), Q = A' (sorted, N = I), bias weights s.   dW1: P = dH (sorted, M = N1),
    Q = x (gathered, N = H), bias weights 1."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles

    # ---- This expert's segment of sorted rows ----
    segment = tl.load(offsets_ptr + expert).to(tl.int64)
    rows = tl.load(counts_ptr + expert)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rr = tl.arange(0, BLOCK_K)

    # ---- Main loop over the segment: acc += P[rows]ᵀ · Q[rows] ----
    # Both operands are loaded row-major ([rows, cols]); the transposed P is an MN-major MMA operand, which
    # wgmma reads from shared memory for 16-bit types ("ieee" keeps fp32 off TF32, as in the forward).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_K):
        r_mask = rr < rows - r0
        sorted_row = segment + r0 + rr
        p = segment_rows_tile(p_ptr, sorted_row, r_mask, rm, m_mask, stride_pr, stride_pc, sorted_pairs_ptr,
                              pair_token_ptr, TOP_K, GATHER_P, FLAT_PAIRS)
        q = segment_rows_tile(q_ptr, sorted_row, r_mask, rn, n_mask, stride_qr, stride_qc, sorted_pairs_ptr,
                              pair_token_ptr, TOP_K, GATHER_Q, FLAT_PAIRS)
        acc = tl.dot(tl.trans(p), q, acc, input_precision="ieee")
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    # ---- Bias gradient: a second, MMA-free pass over P by the first N-tile's programs ----
    # Kept out of the main loop so that it stays a pure load → MMA pipeline (wgmma, cp.async: see
    # tests/test_compile_only.py). P's rows were just streamed by this program, likely still in L2.
    if HAS_BIAS:
        if pid_n == 0:
            bias_acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            for r0 in range(0, rows, BLOCK_K):
                r_mask = rr < rows - r0
                sorted_row = segment + r0 + rr
                p = segment_rows_tile(p_ptr, sorted_row, r_mask, rm, m_mask, stride_pr, stride_pc, sorted_pairs_ptr,
                                      pair_token_ptr, TOP_K, GATHER_P, FLAT_PAIRS).to(tl.float32)
                if BIAS_WEIGHTED:
                    p *= pair_weights(sorted_row, r_mask, sorted_pairs_ptr, topk_w_ptr, TOP_K, stride_st,
                                      stride_sk)[:, None]
                bias_acc += p
            tl.store(bias_grad_ptr + expert.to(tl.int64) * stride_be + rm * stride_bm,
                     tl.sum(bias_acc, axis=0).to(bias_grad_ptr.dtype.element_ty), mask=m_mask)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackwardConfig:
    """Tile configs of the backward's GEMMs. For `weight`, block_m × block_n is the output tile of dW and
    block_k the rows of the expert's segment consumed per step."""

    activation: GemmConfig  # 1. dA' with the activation-backward epilogue
    weight: GemmConfig  # 3. dW1 / dW2 (varlen-K)
    dx: GemmConfig  # 4. dX = dH · W1 (the forward's kernel)

    @classmethod
    def uniform(cls, config: GemmConfig) -> BackwardConfig:
        return cls(config, config, config)

    @classmethod
    def default(cls, dtype: torch.dtype) -> BackwardConfig:
        """Untuned, like `GemmConfig.default`, and checked the same way (tests/test_compile_only.py): no spills
        on sm_80 / sm_90 (H = I = 128), wgmma on sm_90 for fp16/bf16.

        The activation GEMM's epilogue holds dA', x0, x1, act, d0, d1 (six BLOCK_M × BLOCK_N fp32 tiles) plus
        the activation's temporaries. fp16/bf16: with the forward's 64×64 tile at 4 warps, SwiGLU took 250
        registers on sm_80 and GPT-OSS's clamp GLU spilled 8-16 B on sm_90; 8 warps (two warpgroups, still
        wgmma): 128 registers, 48 KiB shared, no spills. fp32: 64×64 at 8 warps spilled 8-16 B; 64×32: 76-80
        registers, no spills. The varlen-K and dX GEMMs use the forward's default (no spills: 64-128 registers).
        """
        base = GemmConfig.default(dtype)
        if dtype == torch.float32:
            activation = GemmConfig(block_m=64, block_n=32, block_k=32, num_warps=8, num_stages=3)
        else:
            activation = GemmConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3)
        return cls(activation=activation, weight=base, dx=base)


@dataclass(frozen=True)
class RouterGradMeta:
    """Block sizes of `router_grad_kernel`: a function of the spec and the activation GEMM's BLOCK_N only."""

    num_tiles: int  # NT: partial sums per row
    block_p: int
    block_j: int
    block_h: int

    @classmethod
    def for_layer(cls, intermediate: int, hidden: int, block_n: int) -> RouterGradMeta:
        num_tiles = triton.cdiv(intermediate, block_n)
        # Tiles of BLOCK_P × (BLOCK_J or BLOCK_H) fp32: at most 4K elements (32 registers a thread at 4 warps).
        block_p = 32
        return cls(num_tiles, block_p, min(128, triton.next_power_of_2(num_tiles)),
                   min(128, triton.next_power_of_2(hidden)))


@functools.lru_cache(maxsize=256)
def _rows_read(spec: MoESpec) -> tuple[tuple[int, ...], bool]:
    """(up-projection rows that both activation inputs read, sorted; whether the inputs read every row)."""
    reads = [{off + step * n for n in range(spec.intermediate)} for off, step in spec.activation.slices]
    both = reads[0] & reads[1] if len(reads) == 2 else set()
    return tuple(sorted(both)), len(set().union(*reads)) == spec.up_rows


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


def moe_backward(
    spec: MoESpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    h: torch.Tensor,
    *,
    config: BackwardConfig | GemmConfig | None = None,
    w3: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """(dx, dtopk_w, dw1, dw2, db1, db2, dw3): the gradients of `moe_forward`'s y with respect to its inputs,
    given dy [T, H] (any float dtype; cast to the weights' dtype, as torch's autograd of a low-precision layer
    does) and h, the [T·K, N1] pre-activations `moe_forward(..., save_h=True)` returned.

    dx [T, H] dtype of x; dtopk_w [T, K] dtype of topk_w (0 for dropped pairs); dw1 [E, N1, H], dw2 [E, H, I]
    contiguous, dtype of the weights; db1 [E, N1], db2 [E, H] dtype of the biases, None without them. With w3
    (`MoESpec.w3`): dw1 and dw3 [E, I, H] contiguous, separate tensors; else dw3 is None.
    The routing plan is recomputed (deterministic, cheap); the activation's derivative is generated from
    spec.activation.expr. config: one GemmConfig for every GEMM, or a BackwardConfig
    (default: `BackwardConfig.default(dtype)`).
    """
    check_layer_inputs(spec, x, topk_ids, topk_w, w1, w2, b1, b2, w3)
    check_triton_device(x)
    T = x.shape[0]
    plan = functools.partial(routing_plan, topk_ids, spec.num_experts)
    return _backward_on_plan(spec, dy, x, plan, topk_ids, topk_w, w1, w2, b1, b2, h, config, w3,
                             num_pairs=T * spec.top_k)


def moe_pairs_backward(
    spec: MoESpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    pair_token: torch.Tensor,
    pair_expert: torch.Tensor,
    pair_weight: torch.Tensor,
    token_offsets: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    h: torch.Tensor,
    *,
    config: BackwardConfig | GemmConfig | None = None,
    w3: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """`moe_backward` on flat pairs (`moe.moe_pairs_forward`): (dx, dpair_weight, dw1, dw2, db1, db2, dw3), with h the
    [S_max, N1] pre-activations `moe_pairs_forward(..., save_h=True)` returned and dpair_weight [S_max] in
    pair_weight's dtype (0 in unused slots). Same launches, no host sync."""
    check_pairs_inputs(spec, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3)
    check_triton_device(x)
    plan = functools.partial(flat_pairs_plan, pair_token, pair_expert, token_offsets, spec.num_experts)
    grads = _backward_on_plan(spec, dy, x, plan, pair_expert.unsqueeze(1), pair_weight.unsqueeze(1), w1, w2, b1, b2,
                              h, config, w3, num_pairs=pair_expert.shape[0])
    return (grads[0], grads[1].squeeze(1), *grads[2:])


def _backward_on_plan(spec: MoESpec, dy, x, make_plan, ids, weights, w1, w2, b1, b2, h, config, w3, *, num_pairs):
    """The launches of both forms: ids and weights [T, K], or [S, 1] for flat pairs; make_plan() builds the
    routing plan (after the remaining checks, and only if there is a token)."""
    # ---- Check ----
    E, H, I, N1 = spec.num_experts, spec.hidden, spec.intermediate, spec.up_rows  # noqa: E741
    dtype = TORCH_DTYPES[spec.dtype]
    T = x.shape[0]
    S = num_pairs
    check_shape("dy", dy, (T, H))
    check_dtype("dy", dy, tuple(TORCH_DTYPES.values()))
    check_shape("h", h, (S, N1))
    check_dtype("h", h, (dtype,))
    for name, tensor in (("dy", dy), ("h", h)):
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {tensor.device}")
    overlap, covers_all_rows = _rows_read(spec)
    if overlap:
        raise ValueError(f"activation slices {spec.activation.slices} both read up-projection rows "
                         f"{list(overlap[:4])}…: the fused backward writes each row of dH from one input; "
                         f"express the activation with one input reading those rows")
    if config is None:
        config = BackwardConfig.default(dtype)
    elif isinstance(config, GemmConfig):
        config = BackwardConfig.uniform(config)

    # ---- Allocate ----
    device = x.device
    dweights = torch.empty(weights.shape, dtype=weights.dtype, device=device)
    # Two separate gradients with w3: the custom ops may not return views of one buffer (outputs may not alias).
    dw1 = torch.empty(E, N1 if w3 is None else I, H, dtype=w1.dtype, device=device)
    dw3 = torch.empty(E, I, H, dtype=w3.dtype, device=device) if w3 is not None else None
    dw2 = torch.empty(E, H, I, dtype=w2.dtype, device=device)
    db1 = torch.empty(E, N1, dtype=b1.dtype, device=device) if b1 is not None else None
    db2 = torch.empty(E, H, dtype=b2.dtype, device=device) if b2 is not None else None
    if T == 0:
        # Flat pairs may still have (unused) slots: their weights get no gradient.
        for grad in (dweights, dw1, dw2, db1, db2, dw3):
            if grad is not None:
                grad.zero_()
        return torch.empty(0, H, dtype=dtype, device=device), dweights, dw1, dw2, db1, db2, dw3
    dy = dy.to(dtype)  # no copy when it already is
    # Rows no activation input reads get no gradient; the dW1 and dX GEMMs read every column of dH.
    dh = (torch.empty if covers_all_rows else torch.zeros)(S, N1, dtype=dtype, device=device)
    a_prime = torch.empty(S, I, dtype=dtype, device=device)
    router_meta = RouterGradMeta.for_layer(I, H, config.activation.block_n)
    ds = torch.empty(S, router_meta.num_tiles, dtype=torch.float32, device=device)

    # ---- Launch ----
    plan = make_plan()
    activation_grad = load_activation_grad(spec.activation.expr, spec.activation.num_inputs)
    _activation_backward(spec, dy, w2, h, weights, dh, a_prime, ds, plan, activation_grad, config.activation)
    _router_grad(ds, dy, b2, ids, plan, dweights, router_meta)
    # dW2[e] = Σ dyᵀ A' (M = H, N = I);  dW1[e] = Σ dHᵀ x (M = N1, N = H)
    _weight_grad(dy, a_prime, dw2, db2, weights, plan, gather_p=True, config=config.weight)
    if w3 is None:
        _weight_grad(dh, x, dw1, db1, None, plan, gather_p=False, config=config.weight)
        dx_sorted = grouped_gemm(dh, w1.transpose(1, 2), plan, out_cols=H, config=config.dx)
    else:  # each tensor's gradient from its half of dH's columns (strided views, no copy); dX in one GEMM
        _weight_grad(dh[:, :I], x, dw1, None, None, plan, gather_p=False, config=config.weight)
        _weight_grad(dh[:, I:], x, dw3, None, None, plan, gather_p=False, config=config.weight)
        dx_sorted = grouped_gemm(dh, w1.transpose(1, 2), plan, out_cols=H, config=config.dx,
                                 w3=w3.transpose(1, 2), split_k=True)
    dx = combine(dx_sorted, None, plan, out_dtype=dtype)
    return dx, dweights, dw1, dw2, db1, db2, dw3


def _pair_token_arg(plan: RoutingPlan) -> torch.Tensor:
    return plan.pair_token if plan.flat_pairs else plan.sorted_pairs  # sorted_pairs: never read (FLAT_PAIRS=False)


def _m_tiles(plan: RoutingPlan, block_m: int) -> int:
    # Σ_e cdiv(counts[e], BLOCK_M) <= cdiv(S, BLOCK_M) + E, and never more than S (a tile holds >= 1 row).
    return min(plan.num_pairs, triton.cdiv(plan.num_pairs, block_m) + plan.num_experts)


def _activation_backward(spec, dy, w2, h, topk_w, dh, a_prime, ds, plan, activation_grad, config: GemmConfig):
    w = w2.transpose(1, 2)  # [E, I, H]: out × in of dA' = dy · W2
    meta = activation_backward_constexprs(spec, activation_grad, config, flat_pairs=plan.flat_pairs)
    grid = (_m_tiles(plan, config.block_m), ds.shape[1])
    activation_backward_kernel[grid](
        dy, w, h, topk_w, dh, a_prime, ds, plan.counts, plan.offsets, plan.sorted_pairs, _pair_token_arg(plan),
        spec.intermediate, spec.hidden, spec.num_experts, plan.top_k,
        dy.stride(0), dy.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        h.stride(0), h.stride(1),
        topk_w.stride(0), topk_w.stride(1),
        dh.stride(0), dh.stride(1),
        a_prime.stride(0), a_prime.stride(1),
        ds.stride(0), ds.stride(1),
        **meta, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _router_grad(ds, dy, b2, topk_ids, plan: RoutingPlan, out, meta: RouterGradMeta):
    S = plan.num_pairs
    has_bias = b2 is not None
    b2_arg, b2_strides = (b2, b2.stride()) if has_bias else (ds, (0, 0))  # ds: never read
    router_grad_kernel[(triton.cdiv(S, meta.block_p),)](
        ds, dy, b2_arg, topk_ids, _pair_token_arg(plan), plan.pair_pos, plan.offsets, out,
        S, dy.shape[1], plan.num_experts, plan.top_k, meta.num_tiles,
        ds.stride(0), ds.stride(1),
        dy.stride(0), dy.stride(1),
        *b2_strides,
        topk_ids.stride(0), topk_ids.stride(1),
        out.stride(0), out.stride(1),
        **router_grad_constexprs(has_bias, meta, flat_pairs=plan.flat_pairs), num_warps=ROUTER_WARPS,
    )


def _weight_grad(p, q, c, bias_grad, topk_w, plan: RoutingPlan, *, gather_p: bool, config: GemmConfig):
    """c[e] = Σ_r P_rᵀ Q_r and bias_grad[e] = Σ_r w_r·P_r over e's rows; exactly one of P, Q is gathered."""
    E, M, N = c.shape
    meta = weight_grad_constexprs(gather_p=gather_p, has_bias=bias_grad is not None,
                                  bias_weighted=topk_w is not None, config=config, flat_pairs=plan.flat_pairs)
    bias_arg, bias_strides = (bias_grad, bias_grad.stride()) if bias_grad is not None else (c, (0, 0))
    w_arg, w_strides = (topk_w, topk_w.stride()) if topk_w is not None else (c, (0, 0))  # c: never read
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), E)
    weight_grad_kernel[grid](
        p, q, c, w_arg, bias_arg, plan.counts, plan.offsets, plan.sorted_pairs, _pair_token_arg(plan),
        M, N, plan.top_k,
        p.stride(0), p.stride(1),
        q.stride(0), q.stride(1),
        c.stride(0), c.stride(1), c.stride(2),
        *w_strides,
        *bias_strides,
        **meta, num_warps=config.num_warps, num_stages=config.num_stages,
    )


# ---------------------------------------------------------------------------------------------------------
# Constexprs (shared by the launches and the compile-only builds)
# ---------------------------------------------------------------------------------------------------------


def activation_backward_constexprs(spec: MoESpec, activation_grad, config: GemmConfig, *,
                                   flat_pairs: bool = False) -> dict:
    (off0, step0), (off1, step1) = spec.activation.slices[0], spec.activation.slices[-1]
    return dict(
        OFF0=off0, STEP0=step0, OFF1=off1, STEP1=step1, NUM_INPUTS=spec.activation.num_inputs,
        ACTIVATION_GRAD=activation_grad, FLAT_PAIRS=flat_pairs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(spec.num_experts),
    )


def router_grad_constexprs(has_bias: bool, meta: RouterGradMeta, *, flat_pairs: bool = False) -> dict:
    return dict(HAS_BIAS=has_bias, FLAT_PAIRS=flat_pairs, BLOCK_P=meta.block_p, BLOCK_J=meta.block_j,
                BLOCK_H=meta.block_h)


def weight_grad_constexprs(*, gather_p: bool, has_bias: bool, bias_weighted: bool, config: GemmConfig,
                           flat_pairs: bool = False) -> dict:
    return dict(
        GATHER_P=gather_p, GATHER_Q=not gather_p, HAS_BIAS=has_bias, BIAS_WEIGHTED=bias_weighted,
        FLAT_PAIRS=flat_pairs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )


# ---------------------------------------------------------------------------------------------------------
# Compile-only builds
# ---------------------------------------------------------------------------------------------------------

# As `moe.FORWARD_ALIGNED_INTS`: sizes and outer strides that are multiples of 16 whenever H, I and N1 are.
_ALIGNED_INTS = frozenset({"N", "KDIM", "M", "H", "stride_dyt", "stride_we", "stride_wk", "stride_w3e", "stride_w3k",
                           "stride_hm", "stride_dhm",
                           "stride_apm", "stride_be", "stride_pr", "stride_qr", "stride_ce", "stride_cm",
                           "stride_am", "stride_ym", "stride_ot"})


def backward_kernel_sources(
    spec: MoESpec,
    activation_grad,
    config: BackwardConfig | GemmConfig | None = None,
    ids_dtype: torch.dtype = torch.int32,
    flat_pairs: bool = False,
) -> list[KernelSource]:
    """Every kernel `moe_backward` launches besides the routing plan's (those are `moe.kernel_sources`'), with
    the specialisations a launch on contiguous tensors gets (inner strides 1, the rest divisible by 16); with
    flat_pairs, those of `moe_pairs_backward`."""
    dtype = TORCH_DTYPES[spec.dtype]
    if config is None:
        config = BackwardConfig.default(dtype)
    elif isinstance(config, GemmConfig):
        config = BackwardConfig.uniform(config)
    ptr, i32p, f32p = POINTER_TYPES[dtype], "*i32", "*fp32"
    plan_args = {"counts_ptr": i32p, "offsets_ptr": i32p, "sorted_pairs_ptr": i32p, "pair_token_ptr": i32p}

    def source(name, fn, runtime_args, consts, cfg_warps, cfg_stages):
        return KernelSource(name, fn, with_constexprs(runtime_args, consts), consts, cfg_warps, cfg_stages,
                            aligned_ints=_ALIGNED_INTS)

    sources = []
    # ---- 1. dA' with the activation backward (w = w2ᵀ: unit stride along I) ----
    cfg = config.activation
    consts = {"stride_dyh": 1, "stride_wn": 1, "stride_hn": 1, "stride_sk": 1, "stride_dhn": 1, "stride_apn": 1,
              "stride_dsn": 1, **activation_backward_constexprs(spec, activation_grad, cfg, flat_pairs=flat_pairs)}
    args = {"dy_ptr": ptr, "w_ptr": ptr, "h_ptr": ptr, "topk_w_ptr": f32p, "dh_ptr": ptr, "a_prime_ptr": ptr,
            "ds_ptr": f32p, **plan_args, "N": "i32", "KDIM": "i32", "E": "i32", "TOP_K": "i32",
            "stride_dyt": "i32", "stride_we": "i32", "stride_wk": "i32", "stride_hm": "i32", "stride_st": "i32",
            "stride_dhm": "i32", "stride_apm": "i32", "stride_dsm": "i32"}
    sources.append(source("activation_backward", activation_backward_kernel, args, consts, cfg.num_warps,
                          cfg.num_stages))

    # ---- 2. dtopk_w ----
    meta = RouterGradMeta.for_layer(spec.intermediate, spec.hidden, cfg.block_n)
    consts = {"stride_dsn": 1, "stride_dyh": 1, "stride_bh": 1, "stride_ik": 1, "stride_ok": 1,
              **router_grad_constexprs(spec.w2_bias, meta, flat_pairs=flat_pairs)}
    args = {"ds_ptr": f32p, "dy_ptr": ptr, "b2_ptr": ptr, "topk_ids_ptr": POINTER_TYPES[ids_dtype],
            "pair_token_ptr": i32p, "pair_pos_ptr": i32p, "offsets_ptr": i32p, "out_ptr": f32p, "S": "i32", "H": "i32",
            "E": "i32", "TOP_K": "i32", "NT": "i32", "stride_dsm": "i32", "stride_dyt": "i32", "stride_be": "i32",
            "stride_it": "i32", "stride_ot": "i32"}
    sources.append(source("router_grad", router_grad_kernel, args, consts, ROUTER_WARPS, 1))

    # ---- 3. dW2 (P = dy gathered, bias weighted by s), dW1 (Q = x gathered, bias unweighted) ----
    cfg = config.weight
    args = {"p_ptr": ptr, "q_ptr": ptr, "c_ptr": ptr, "topk_w_ptr": f32p, "bias_grad_ptr": ptr, **plan_args,
            "M": "i32", "N": "i32", "TOP_K": "i32", "stride_pr": "i32", "stride_qr": "i32", "stride_ce": "i32",
            "stride_cm": "i32", "stride_st": "i32", "stride_be": "i32"}
    for name, gather_p, has_bias in (("dw2", True, spec.w2_bias), ("dw1", False, spec.w1_bias)):
        consts = {"stride_pc": 1, "stride_qc": 1, "stride_cn": 1, "stride_sk": 1, "stride_bm": 1,
                  **weight_grad_constexprs(gather_p=gather_p, has_bias=has_bias, bias_weighted=gather_p, config=cfg,
                                           flat_pairs=flat_pairs)}
        sources.append(source(f"weight_grad_{name}", weight_grad_kernel, args, consts, cfg.num_warps,
                              cfg.num_stages))

    # (With spec.w3, dW1 and dW3 are this dw1 specialisation twice, on the two column halves of dH.)

    # ---- 4. dX = dH · W1 (w = w1ᵀ: unit stride along H, the output columns), unweighted gather-sum; with spec.w3
    # dX = dH[:, :I] · W1 + dH[:, I:] · W3 in one GEMM (SPLIT_K, w3ᵀ laid out like w1ᵀ) ----
    cfg = config.dx
    consts = {"stride_ak": 1, "stride_wn": 1, "stride_w3n": 1, "stride_bn": 1, "stride_cn": 1, "stride_hn": 1,
              **gemm_constexprs(slices=((0, 1),), activation=identity, has_bias=False, gather=False,
                                num_experts=spec.num_experts, config=cfg, flat_pairs=flat_pairs, split_k=spec.w3)}
    args = {**gemm_signature(ptr), "stride_wk": "i32", "stride_w3k": "i32"}
    sources.append(source("dx_gemm", grouped_gemm_kernel, args, consts, cfg.num_warps, cfg.num_stages))
    sources.append(combine_source("combine_unweighted", ptr, ptr, spec.hidden, weighted=False, flat_pairs=flat_pairs))
    return sources
