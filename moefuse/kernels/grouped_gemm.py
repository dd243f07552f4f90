"""The varlen-M grouped GEMM of both expert projections: C[rows of e] = act(A[rows of e] · W[e]ᵀ + b[e]).

Rows are the expert-sorted pairs of a `RoutingPlan`: expert e owns rows offsets[e] .. offsets[e] + counts[e].
One kernel, specialised by constexprs:
  - up-projection:   GATHER=True, A rows are gathered from x inside the load (row r of expert e is token
                     sorted_pairs[offsets[e] + r] // K, or pair_token[that pair] with FLAT_PAIRS; the gathered
                     X is never written to memory);
                     NUM_INPUTS=2 for a GLU, the epilogue applies the activation; STORE_H=True also writes
                     the pre-activations H for the backward, from the same accumulators (no extra pass).
  - down-projection: GATHER=False, A = [S, I] already in sorted order; NUM_INPUTS=1, identity epilogue.
  - backward dX:     dH · W1 with W = w1 viewed [E, H, N1] (see `moefuse.kernels.backward`).
Gate and up as two tensors (`MoESpec.w3`: w1 and w3, each [E, I, H]) add a second weight pointer, never a copy:
  - SPLIT_W (up-projection): the weights are the virtual [w; w3] (N_ROWS = 2·N): accumulator j reads row n of
                     w if OFF_j = 0, of w3 if OFF_j = N, while its h (and bias) columns stay OFF_j + STEP_j·n;
  - SPLIT_K (backward dX = dH[:, :I]·W1 + dH[:, I:]·W3): A has 2·KDIM columns, the first KDIM multiply w,
                     the last KDIM w3, into one fp32 accumulator.

The tile location, the gathered row indices and the main loop are @triton.jit building blocks that the
backward's fused activation-gradient GEMM shares.

Tiles never straddle experts and an expert's partial last tile is masked, so no padded rows exist. The grid is
sized by an upper bound on the M-tiles (cdiv(S, BLOCK_M) + E) and each program finds its (expert, first row)
from `counts` on the device, so nothing waits on the host and a new token count never recompiles. Two options
of the same kernel (`GemmConfig`), both off by default:
  - persistent: a grid of a few programs per SM, each walking output tiles up to the real count read on the
                device, in an order that keeps an expert's weight N-panel in L2 while GROUP_M of its M-tiles
                read it (`schedule_tile`);
  - tma:        the weight tiles arrive by TMA from a host-made tensor descriptor on sm_90+ (and under the
                interpreter), where the weights' strides allow it (`weight_tma`), else by the pointer loads.

Weights are logical [E, N_ROWS, KDIM] (out × in) with arbitrary strides: a weight stored transposed is the same
kernel with swapped strides, never a copy. Accumulator j of output column n reads weight row OFF_j + STEP_j·n,
which covers SwiGLU stored [gate; up] ((0, 1), (I, 1)), [up; gate] ((I, 1), (0, 1)) and interleaved
((0, 2), (1, 2)).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moefuse.kernels.routing import RoutingPlan


@triton.jit
def identity(x):
    """The epilogue of a projection without activation (the down-projection)."""
    return x


# ---------------------------------------------------------------------------------------------------------
# Building blocks, shared with the backward kernels (`moefuse.kernels.backward`)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def m_tile_table(counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The M-tiles of a varlen-M grid, per expert: (experts, counts, tiles, tiles_end), each [BLOCK_E] int32.

    Expert e owns tiles[e] = cdiv(counts[e], BLOCK_M) M-tiles, numbered in expert order; tiles_end[e] is the
    running total through e (entries >= E are 0 tiles)."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    tiles = tl.cdiv(counts, BLOCK_M)
    return experts, counts, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def m_tile_rows(expert, tile_in_expert, experts, counts, offsets_ptr, BLOCK_M: tl.constexpr):
    """(m_mask, sorted_row) of the tile_in_expert-th M-tile of `expert`: sorted_row [BLOCK_M] int64 are its rows
    in expert-sorted order, m_mask masks the rows past the expert's end."""
    rows_of_expert = tl.sum(tl.where(experts == expert, counts, 0), axis=0)
    segment = tl.load(offsets_ptr + expert)
    rm = tile_in_expert * BLOCK_M + tl.arange(0, BLOCK_M)
    # int64: products with the row strides can pass 2**31 (S·KDIM, S·N)
    return rm < rows_of_expert, (segment + rm).to(tl.int64)


@triton.jit
def locate_m_tile(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Where the pid_m-th M-tile of a varlen-M grid lies: (num_tiles, expert, m_mask, sorted_row).

    M-tiles are numbered in expert order, cdiv(counts[e], BLOCK_M) per expert. num_tiles is the real count: a
    program with pid_m >= num_tiles owns nothing and must exit (its other values are meaningless). sorted_row
    [BLOCK_M] int64 are the tile's rows in expert-sorted order; m_mask masks the rows past the expert's end."""
    experts, counts, tiles, tiles_end = m_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(experts == expert, tiles_end - tiles, 0), axis=0)
    m_mask, sorted_row = m_tile_rows(expert, pid_m - first_tile, experts, counts, offsets_ptr, BLOCK_M)
    return tl.sum(tiles, axis=0), expert, m_mask, sorted_row


@triton.jit
def schedule_tile(tile, num_n, experts, tiles, tiles_end, GROUP_M: tl.constexpr):
    """(expert, M-tile within the expert, N-tile) of the tile-th output tile of a persistent walk.

    Output tiles are numbered expert by expert (tiles[e]·num_n each); within an expert, in groups of GROUP_M
    M-tiles, the group's M-tiles fastest, then its N-tiles. Consecutive programs run consecutive tiles at the
    same time, so GROUP_M of them read the same N-panel of the expert's weights (one DRAM read, the rest hit
    L2) and a group's A-tiles are re-read from L2 for each N-panel. With one M-tile per expert (decode) this is
    N-major within the expert."""
    expert = tl.sum((tiles_end * num_n <= tile).to(tl.int32), axis=0)
    first_m = tl.sum(tl.where(experts == expert, tiles_end - tiles, 0), axis=0)
    m_tiles = tl.sum(tl.where(experts == expert, tiles, 0), axis=0)
    local = tile - first_m * num_n
    group_first = (local // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(m_tiles - group_first, GROUP_M)  # the expert's last group may be short
    in_group = local % (GROUP_M * num_n)
    return expert, group_first + in_group % group_size, in_group // group_size


@triton.jit
def operand_rows(sorted_row, mask, sorted_pairs_ptr, pair_token_ptr, TOP_K, GATHER: tl.constexpr,
                 FLAT_PAIRS: tl.constexpr):
    """The row each sorted row reads in an operand, int64: if GATHER (an operand indexed by token, x or dy,
    gathered inside the load and never materialised) the token of its pair p = sorted_pairs[r] — p // TOP_K,
    or pair_token[p] with FLAT_PAIRS — else r itself."""
    if GATHER:
        pair = tl.load(sorted_pairs_ptr + sorted_row, mask=mask, other=0)
        if FLAT_PAIRS:
            row = tl.load(pair_token_ptr + pair, mask=mask, other=0).to(tl.int64)
        else:
            row = (pair // TOP_K).to(tl.int64)
    else:
        row = sorted_row
    return row


@triton.jit
def varlen_m_mainloop(
    a_ptr, a_row, m_mask, stride_am, stride_ak,  # A rows a_row [BLOCK_M] (int64), masked by m_mask
    w, w_row0, n_mask, stride_wn, stride_wk,  # accumulator 0's weights (the expert's) and the rows w_row0 it reads
    v, w_row1, stride_vn, stride_vk,  # accumulator 1's: v is w itself unless the weights are split (SPLIT_W)
    KDIM,
    NUM_INPUTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_TMA: tl.constexpr,
):
    """(acc0, acc1) [BLOCK_M, BLOCK_N] fp32: acc0 = A[a_row] · W[w_row0]ᵀ and acc1 = A[a_row] · V[w_row1]ᵀ over
    KDIM. One A tile feeds NUM_INPUTS weight tiles; with NUM_INPUTS=1, acc1 stays zero (and is dead code in the
    caller). A caller with one weight tensor passes it (and its strides) as both w and v: the same values, so
    the same code as a loop with one weight pointer.

    W_TMA=False: w and v point at the expert's weights, read through the strides at rows w_row_j, masked by
    n_mask. W_TMA=True: w and v are tensor descriptors of all experts' weights viewed [E·N_ROWS, KDIM] (unit
    inner stride) and w_row_j the first row of tile j (a scalar, rows are consecutive): the [BLOCK_N, BLOCK_K]
    tiles arrive by TMA, zero past the view's end; rows past the N-panel are read unmasked and land in output
    columns the caller's n_mask does not store."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + rk[None, :] * stride_ak
    if not W_TMA:
        w_ptrs0 = w + w_row0[None, :] * stride_wn + rk[:, None] * stride_wk
        w_ptrs1 = v + w_row1[None, :] * stride_vn + rk[:, None] * stride_vk
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # fp32 accumulation always; "ieee" keeps fp32 inputs out of TF32 (10-bit mantissa, ~1e-3 relative error)
    # so fp32 results match a float64 reference to ~1e-5. It is ignored for fp16/bf16 inputs.
    for k0 in range(0, KDIM, BLOCK_K):
        k_mask = rk < KDIM - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if W_TMA:
            w0 = w.load([w_row0, k0]).T
        else:
            w0 = tl.load(w_ptrs0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            w_ptrs0 += BLOCK_K * stride_wk
        acc0 = tl.dot(a, w0, acc0, input_precision="ieee")
        if NUM_INPUTS == 2:
            if W_TMA:
                w1 = v.load([w_row1, k0]).T
            else:
                w1 = tl.load(w_ptrs1, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                w_ptrs1 += BLOCK_K * stride_vk
            acc1 = tl.dot(a, w1, acc1, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
    return acc0, acc1


# ---------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def grouped_gemm_tile(
    a_ptr, w_ptr, w3_ptr, bias_ptr, c_ptr, h_ptr, sorted_pairs_ptr, pair_token_ptr,
    N, KDIM, TOP_K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_w3e, stride_w3n, stride_w3k, stride_be, stride_bn,
    stride_cm, stride_cn, stride_hm, stride_hn,
    expert, m_mask, sorted_row, pid_n,  # the output tile: BLOCK_M sorted rows of `expert` × N-tile pid_n
    OFF0: tl.constexpr, STEP0: tl.constexpr, OFF1: tl.constexpr, STEP1: tl.constexpr,
    NUM_INPUTS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    FLAT_PAIRS: tl.constexpr, STORE_H: tl.constexpr, W_TMA: tl.constexpr, SPLIT_W: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One output tile of `grouped_gemm_kernel` (its arguments, same meaning), whichever grid found it."""
    a_row = operand_rows(sorted_row, m_mask, sorted_pairs_ptr, pair_token_ptr, TOP_K, GATHER, FLAT_PAIRS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    # Columns of h and rows of the bias: OFF_j + STEP_j·n of the (virtual, with SPLIT_W) up-projection.
    col0 = (OFF0 + STEP0 * rn).to(tl.int64)  # int64: E·N_ROWS·KDIM can pass 2**31
    col1 = (OFF1 + STEP1 * rn).to(tl.int64)

    # ---- Which tensor and rows each accumulator reads ----
    if SPLIT_W:
        # Virtual row r of [w; w3] is w's row r for r < N, else w3's row r − N; the spec allows only OFF_j ∈ {0, N}
        # with STEP_j = 1 (one input per tensor), so either way accumulator j reads row n of one tensor.
        w_row0 = rn.to(tl.int64)
        w_row1 = w_row0
        if OFF0 == 0:
            src0, s0e, s0n, s0k, src1, s1e, s1n, s1k = (w_ptr, stride_we, stride_wn, stride_wk,
                                                        w3_ptr, stride_w3e, stride_w3n, stride_w3k)
        else:
            src0, s0e, s0n, s0k, src1, s1e, s1n, s1k = (w3_ptr, stride_w3e, stride_w3n, stride_w3k,
                                                        w_ptr, stride_we, stride_wn, stride_wk)
    else:
        w_row0 = col0
        w_row1 = col1
        src0, s0e, s0n, s0k, src1, s1e, s1n, s1k = (w_ptr, stride_we, stride_wn, stride_wk,
                                                    w_ptr, stride_we, stride_wn, stride_wk)

    # ---- Main loop ----
    if W_TMA:  # rows of each [E·rows, KDIM] view: expert e's start at e·rows = e·stride_e / stride_n
        row0 = expert * (s0e // s0n) + pid_n * BLOCK_N
        row1 = expert * (s1e // s1n) + pid_n * BLOCK_N
        if not SPLIT_W:
            row0 += OFF0
            row1 += OFF1
        acc0, acc1 = varlen_m_mainloop(a_ptr, a_row, m_mask, stride_am, stride_ak, src0, row0, n_mask, s0n, s0k,
                                       src1, row1, s1n, s1k, KDIM, NUM_INPUTS, BLOCK_M, BLOCK_N, BLOCK_K, True)
    else:
        acc0, acc1 = varlen_m_mainloop(a_ptr, a_row, m_mask, stride_am, stride_ak,
                                       src0 + expert.to(tl.int64) * s0e, w_row0, n_mask, s0n, s0k,
                                       src1 + expert.to(tl.int64) * s1e, w_row1, s1n, s1k,
                                       KDIM, NUM_INPUTS, BLOCK_M, BLOCK_N, BLOCK_K, False)
    if SPLIT_K:
        # A's columns [KDIM, 2·KDIM) times w3, into the same fp32 accumulator: dX = dH[:, :I]·W1 + dH[:, I:]·W3
        # in one kernel, rounded once (two launches and an add would round twice and write dX twice).
        w3_expert = w3_ptr + expert.to(tl.int64) * stride_w3e
        acc3, _ = varlen_m_mainloop(a_ptr + KDIM * stride_ak, a_row, m_mask, stride_am, stride_ak,
                                    w3_expert, w_row0, n_mask, stride_w3n, stride_w3k,
                                    w3_expert, w_row0, stride_w3n, stride_w3k,
                                    KDIM, 1, BLOCK_M, BLOCK_N, BLOCK_K, False)
        acc0 += acc3

    # ---- Epilogue: bias, (pre-activations to h,) activation in fp32, one rounding to the output dtype ----
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        b_expert = bias_ptr + expert.to(tl.int64) * stride_be
        acc0 += tl.load(b_expert + col0 * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if NUM_INPUTS == 2:
            acc1 += tl.load(b_expert + col1 * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_H:
        h_rows = h_ptr + sorted_row[:, None] * stride_hm
        tl.store(h_rows + col0[None, :] * stride_hn, acc0.to(h_ptr.dtype.element_ty), mask=mask)
        if NUM_INPUTS == 2:
            tl.store(h_rows + col1[None, :] * stride_hn, acc1.to(h_ptr.dtype.element_ty), mask=mask)
    if NUM_INPUTS == 2:
        out = ACTIVATION(acc0, acc1)
    else:
        out = ACTIVATION(acc0)
    c_ptrs = c_ptr + sorted_row[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_gemm_kernel(
    # Pointers
    a_ptr,  # GATHER: x [T, KDIM]; else A [S, KDIM] in expert-sorted order; fp16/bf16/fp32
    w_ptr,  # [E, N_ROWS, KDIM] out × in, any strides, dtype of a (W_TMA: a descriptor of it as [E·N_ROWS, KDIM]);
    #         SPLIT_W: [E, N, KDIM], the first half of the virtual [w; w3]; SPLIT_K: multiplies A's first KDIM columns
    w3_ptr,  # SPLIT_W: [E, N, KDIM] the second half of [w; w3] (a descriptor with W_TMA); SPLIT_K: [E, N, KDIM]
    #          multiplying A's columns [KDIM, 2·KDIM); any strides, dtype of a; else never read (the host passes w)
    bias_ptr,  # [E, N_ROWS] any float dtype, any strides; read only if HAS_BIAS
    c_ptr,  # [S, N] out, expert-sorted order; rows of dropped pairs (>= offsets[E]) are not written
    h_ptr,  # [S, N_ROWS] out, dtype of a: the pre-activation accumulators (bias included); written only if STORE_H
    counts_ptr,  # [E] int32, rows of each expert
    offsets_ptr,  # [E + 1] int32, first sorted row of each expert
    sorted_pairs_ptr,  # [S] int32, pair t·TOP_K + k of each sorted row; read only if GATHER
    pair_token_ptr,  # [S] int32/int64, token of each pair; read only if GATHER and FLAT_PAIRS
    # Sizes
    N, KDIM, E, TOP_K,
    # Strides
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_w3e, stride_w3n, stride_w3k,
    stride_be, stride_bn,
    stride_cm, stride_cn,
    stride_hm, stride_hn,
    # Epilogue: accumulator j of output column n reads weight (and bias) row OFF_j + STEP_j·n (of [w; w3])
    OFF0: tl.constexpr, STEP0: tl.constexpr,
    OFF1: tl.constexpr, STEP1: tl.constexpr,
    NUM_INPUTS: tl.constexpr,  # 1, or 2 for a GLU
    ACTIVATION: tl.constexpr,  # @triton.jit fn of NUM_INPUTS fp32 tiles -> fp32 tile
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    FLAT_PAIRS: tl.constexpr,  # pairs are flat (`routing.flat_pairs_plan`): tokens come from pair_token
    STORE_H: tl.constexpr,  # also store each accumulator at its weight rows' columns of h (for the backward)
    # Schedule and loads
    PERSISTENT: tl.constexpr,  # a fixed grid of programs walking the output tiles (see below)
    GROUP_M: tl.constexpr,  # persistent only: M-tiles of one expert that share each weight N-panel in time
    W_TMA: tl.constexpr,  # weight tiles by TMA (w_ptr is a descriptor; STEP0 = STEP1 = 1, see `weight_tma`)
    # Gate and up as two tensors (`MoESpec.w3`), see the module docstring
    SPLIT_W: tl.constexpr,  # the weights are [w; w3]: N_ROWS = 2·N, OFF_j ∈ {0, N}, STEP_j = 1
    SPLIT_K: tl.constexpr,  # A is [S, 2·KDIM]: its first KDIM columns multiply w, the last KDIM w3 (NUM_INPUTS=1)
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,  # power of two >= E
):
    """One program per output tile (PERSISTENT=False), grid (cdiv(S, BLOCK_M) + E, cdiv(N, BLOCK_N)): program
    (i, j) owns output tile j (BLOCK_N columns) of the i-th M-tile in expert order, BLOCK_M rows of one
    expert's segment; programs past the real tile count exit at once.

    PERSISTENT=True, grid (P,) with P from the host (a few per SM): program p runs output tiles p, p + P, …
    up to the real tile count Σ_e cdiv(counts[e], BLOCK_M)·cdiv(N, BLOCK_N), in `schedule_tile`'s order
    (grouped for L2 reuse of the expert weights). Either way a tile also writes the columns of h its
    accumulators came from (STORE_H)."""
    if PERSISTENT:
        experts, counts, tiles, tiles_end = m_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
        num_n = tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), tl.sum(tiles, axis=0) * num_n, tl.num_programs(0)):
            # Re-read per tile (an L1 hit) rather than kept live across the loop: measured, the live table
            # pushed the fp16 GLU up GEMM on sm_80 from 206 registers to 255 + 40 B of spills.
            experts, counts, tiles, tiles_end = m_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
            expert, tile_in_expert, pid_n = schedule_tile(tile, num_n, experts, tiles, tiles_end, GROUP_M)
            m_mask, sorted_row = m_tile_rows(expert, tile_in_expert, experts, counts, offsets_ptr, BLOCK_M)
            grouped_gemm_tile(a_ptr, w_ptr, w3_ptr, bias_ptr, c_ptr, h_ptr, sorted_pairs_ptr, pair_token_ptr, N, KDIM,
                              TOP_K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_w3e, stride_w3n,
                              stride_w3k, stride_be, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn, expert,
                              m_mask, sorted_row, pid_n, OFF0, STEP0, OFF1, STEP1, NUM_INPUTS, ACTIVATION, HAS_BIAS,
                              GATHER, FLAT_PAIRS, STORE_H, W_TMA, SPLIT_W, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid_m = tl.program_id(0)
        num_tiles, expert, m_mask, sorted_row = locate_m_tile(pid_m, counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
        if pid_m >= num_tiles:
            return
        grouped_gemm_tile(a_ptr, w_ptr, w3_ptr, bias_ptr, c_ptr, h_ptr, sorted_pairs_ptr, pair_token_ptr, N, KDIM,
                          TOP_K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_w3e, stride_w3n,
                          stride_w3k, stride_be, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn, expert, m_mask,
                          sorted_row, tl.program_id(1), OFF0, STEP0, OFF1, STEP1, NUM_INPUTS, ACTIVATION, HAS_BIAS,
                          GATHER, FLAT_PAIRS, STORE_H, W_TMA, SPLIT_W, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of one grouped-GEMM launch.

    num_stages is Triton's software pipelining depth: the loads of the next num_stages-1 K-steps are in flight
    (cp.async) while the current one multiplies.

    persistent: launch programs_per_sm programs per SM (a fixed number under the interpreter, see
    `num_programs`), each walking output tiles in an order that keeps an expert's weight N-panel in L2 while
    group_m of its M-tiles read it; else one program per output tile (group_m unused). programs_per_sm=2: two
    of the default fp16/bf16 programs fit an H100 SM (ptxas, sm_90, GLU up GEMM: 72 KiB shared and <= 179
    registers × 128 threads each). ptxas finds no spills for fp16/bf16 at the default tiles on sm_80 and sm_90
    (tests/test_compile_only.py); fp32 persistent spilled 8-16 B at the default tiles.
    tma: load the weight tiles with TMA (a tensor descriptor) where `weight_tma` allows it (sm_90+ or the
    interpreter; fp16/bf16 weights whose strides TMA can describe; SwiGLU halves, not interleaved rows), else
    the same pointer loads as tma=False.
    Each combination is its own compiled specialisation (constexprs); the defaults (both off) compile to the
    same code as before these options existed.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent: bool = False
    programs_per_sm: int = 2
    group_m: int = 8
    tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name}={value}: tl.dot needs a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps={self.num_warps}: expected one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages={self.num_stages}: expected >= 1")
        if self.programs_per_sm < 1 or self.group_m < 1:
            raise ValueError(f"GemmConfig: programs_per_sm={self.programs_per_sm} and group_m={self.group_m} "
                             "must both be >= 1")

    @classmethod
    def default(cls, dtype: torch.dtype) -> GemmConfig:
        """An untuned config that compiles without spills for sm_80 and sm_90, and uses wgmma on sm_90.

        fp16/bf16: BLOCK_M=64 with 4 warps is one warpgroup, the shape wgmma needs. Shared memory per stage
        with a GLU's two weight tiles: (64·64 + 2·64·64)·2 B = 24 KiB; ptxas (H = I = 128, GLU up GEMM):
        sm_90 128 registers, 72 KiB shared; sm_80 199 registers, 48 KiB; no spills.
        fp32 ("ieee", so FMA, not tensor cores): 4 warps spilled the GLU's two 64×64 fp32 accumulators
        (255 registers + 8-16 B spilled); 8 warps: 128-160 registers, no spills.
        """
        if dtype == torch.float32:
            return cls(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3)
        if dtype in (torch.float16, torch.bfloat16):
            return cls(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
        raise ValueError(f"no default GemmConfig for dtype {dtype}; expected float32, float16 or bfloat16")


def gemm_constexprs(
    *,
    slices: tuple[tuple[int, int], ...],
    activation,
    has_bias: bool,
    gather: bool,
    num_experts: int,
    config: GemmConfig,
    store_h: bool = False,
    flat_pairs: bool = False,
    w_tma: bool = False,
    split_w: bool = False,
    split_k: bool = False,
) -> dict:
    """The constexpr arguments of one grouped-GEMM specialisation (shared by the launch and compile-only builds).
    w_tma: `weight_tma`'s decision for this launch (w_ptr, and w3_ptr with split_w, are then TensorDescriptors).
    split_w / split_k: a second weight tensor w3, as the up-projection's second half / as dX's second K-half."""
    if not 1 <= len(slices) <= 2:
        raise ValueError(f"slices: expected 1 or 2 (offset, step) pairs, got {slices}")
    if split_w and split_k:
        raise ValueError("split_w and split_k: a launch splits its weights along N or along K, not both")
    if split_k and (len(slices) != 1 or w_tma):
        raise ValueError("split_k: one accumulator (slices ((0, 1),)) and pointer loads (no TMA)")
    (off0, step0), (off1, step1) = slices[0], slices[-1]
    return dict(
        OFF0=off0, STEP0=step0, OFF1=off1, STEP1=step1,
        NUM_INPUTS=len(slices), ACTIVATION=activation, HAS_BIAS=has_bias, GATHER=gather, FLAT_PAIRS=flat_pairs,
        STORE_H=store_h, PERSISTENT=config.persistent, GROUP_M=config.group_m, W_TMA=w_tma, SPLIT_W=split_w,
        SPLIT_K=split_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
    )


# TMA copies boxes of at most 256 elements per dimension (cuTensorMapEncodeTiled's limit).
TMA_MAX_BOX = 256


def weight_tma(
    config: GemmConfig,
    slices: tuple[tuple[int, int], ...],
    w_shape: tuple[int, int, int],
    w_strides: tuple[int, int, int],
    itemsize: int,
    capability: int | None,
) -> bool:
    """Whether a launch loads its weight tiles by TMA: config.tma, and everything a [BLOCK_N, BLOCK_K] box of
    the weights viewed [E·N_ROWS, KDIM] needs. Shared by the launch and the compile-only builds.

    capability: the GPU's compute capability as 10·major + minor (TMA exists from sm_90), or None for the
    interpreter, which runs descriptors too. The weights: [E, N_ROWS, KDIM] with unit stride along KDIM, experts
    back to back (stride_we = N_ROWS·stride_wn, so the view exists) and a 16-byte row pitch (TMA's rule for
    every stride but the last); the base address's 16-byte alignment is the caller's check. Each slice must
    read consecutive rows (STEP = 1): interleaved GLU weights (GPT-OSS) keep the pointer loads. fp16/bf16
    only: fp32 multiplies on FMAs ("ieee"), not wgmma, and its TMA tiles spilled (ptxas, sm_90: 1136 B in the
    GLU up GEMM at the default tiles)."""
    E, n_rows, kdim = w_shape
    stride_we, stride_wn, stride_wk = w_strides
    return (
        config.tma
        and (capability is None or capability >= 90)
        and itemsize == 2
        and all(step == 1 for _, step in slices)
        and config.block_n <= TMA_MAX_BOX and config.block_k <= TMA_MAX_BOX
        and E * n_rows * kdim > 0
        and stride_wk == 1 and stride_wn > 0 and (stride_wn * itemsize) % 16 == 0
        and (E == 1 or stride_we == n_rows * stride_wn)
    )


def device_capability(device: torch.device) -> int | None:
    """10·major + minor of a CUDA device, None under the interpreter (`weight_tma`'s capability)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# Persistent grids under the interpreter: its programs run one after another, so the count only has to be small
# enough that each program walks several tiles (what the tests exercise).
INTERPRETER_SMS = 2


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, config: GemmConfig) -> int:
    """Programs of a persistent grid (before clamping to the tile count): programs_per_sm per SM of the device,
    or per `INTERPRETER_SMS` pretend SMs under the interpreter. The SM count is a cached host query, no sync."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        sms = INTERPRETER_SMS
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return sms * config.programs_per_sm


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    plan: RoutingPlan,
    *,
    out_cols: int,
    slices: tuple[tuple[int, int], ...] = ((0, 1),),
    activation=identity,
    bias: torch.Tensor | None = None,
    gather: bool = False,
    h: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    w3: torch.Tensor | None = None,
    split_k: bool = False,
) -> torch.Tensor:
    """C [S, out_cols] (dtype of a) in expert-sorted order: C[r] = activation(A[r] · W[e]ᵀ[rows of slices] + b).

    a: x [T, KDIM] if `gather` (rows gathered through plan.sorted_pairs, and plan.pair_token for flat pairs),
    else [S, KDIM] sorted.
    w: [E, N_ROWS, KDIM], any strides. bias: [E, N_ROWS] or None. Rows of dropped pairs are left unwritten.
    h: None, or an [S, N_ROWS] output (dtype of a) that receives the pre-activations A[r] · W[e]ᵀ + b at the
    columns of the weight rows the slices read (the others, and rows of dropped pairs, are left unwritten).
    w3: a second weight tensor, never concatenated with w. Without split_k, W is the virtual [w; w3] along the
    rows: w and w3 are [E, out_cols, KDIM] (N_ROWS = 2·out_cols) and the slices ((0, 1), (out_cols, 1)) or
    swapped (gate and up as w1, w3). With split_k, along K: a is [S, 2·KDIM] and C[r] = A[r, :KDIM] · w[e]ᵀ +
    A[r, KDIM:] · w3[e]ᵀ (the backward's dX), w and w3 [E, out_cols, KDIM], one slice ((0, 1),).
    """
    # ---- Check ----
    E, K = plan.num_experts, plan.top_k
    S = plan.num_pairs
    if a.dim() != 2:
        raise ValueError(f"a: expected a 2-D tensor, got shape {tuple(a.shape)}")
    if split_k and w3 is None:
        raise ValueError("split_k: pass w3, the weights of A's second K-half")
    if split_k and a.shape[1] % 2:
        raise ValueError(f"a: split_k needs an even column count (two K-halves), got shape {tuple(a.shape)}")
    kdim = a.shape[1] // 2 if split_k else a.shape[1]
    if w3 is not None:
        if w3.shape != w.shape or w3.dtype != w.dtype or w3.device != w.device:
            raise ValueError(f"w3: expected the shape, dtype and device of w {tuple(w.shape)} {w.dtype} {w.device}, "
                             f"got {tuple(w3.shape)} {w3.dtype} {w3.device}")
        if w.dim() != 3 or w.shape[1] != out_cols:
            raise ValueError(f"w, w3: expected [{E}, out_cols={out_cols}, KDIM] each, got {tuple(w.shape)}")
        if split_k and tuple(slices) != ((0, 1),):
            raise ValueError(f"split_k: one accumulator (slices ((0, 1),)), got {slices}")
        if not split_k and tuple(slices) not in (((0, 1), (out_cols, 1)), ((out_cols, 1), (0, 1))):
            raise ValueError(f"w3: the slices must read one tensor each, ((0, 1), ({out_cols}, 1)) or swapped; "
                             f"got {slices}")
    split_w = w3 is not None and not split_k
    n_rows = 2 * out_cols if split_w else w.shape[1]  # rows of the (virtual, with split_w) weights
    if gather and plan.flat_pairs and a.shape[0] != plan.num_tokens:
        raise ValueError(f"a: expected [T, KDIM] with T = {plan.num_tokens} (token_offsets has T + 1 entries), "
                         f"got shape {tuple(a.shape)}")
    if gather and not plan.flat_pairs and a.shape[0] * K != S:
        raise ValueError(f"a: expected [T, KDIM] with T·{K} = {S} pairs, got shape {tuple(a.shape)}")
    if not gather and a.shape[0] != S:
        raise ValueError(f"a: expected [{S}, KDIM] (one row per sorted pair), got shape {tuple(a.shape)}")
    if w.dim() != 3 or w.shape[0] != E or w.shape[2] != kdim:
        raise ValueError(f"w: expected shape [{E}, N_ROWS, {kdim}], got {tuple(w.shape)}")
    if w.dtype != a.dtype:
        raise ValueError(f"w: expected dtype {a.dtype} (that of a), got {w.dtype}")
    last_row = max(off + step * (out_cols - 1) for off, step in slices)
    if last_row >= n_rows:
        raise ValueError(f"slices {slices} read weight row {last_row} but w has {n_rows} rows: {tuple(w.shape)}")
    if bias is not None and tuple(bias.shape) != (E, n_rows):
        raise ValueError(f"bias: expected shape ({E}, {n_rows}), got {tuple(bias.shape)}")
    if h is not None and (tuple(h.shape) != (S, n_rows) or h.dtype != a.dtype):
        raise ValueError(f"h: expected shape ({S}, {n_rows}) and dtype {a.dtype}, got {tuple(h.shape)} {h.dtype}")
    config = config or GemmConfig.default(a.dtype)

    # ---- Allocate ----
    c = torch.empty(S, out_cols, dtype=a.dtype, device=a.device)
    if S == 0 or out_cols == 0:
        return c

    # ---- Launch ----
    # With split_w each tensor is one slice's rows (read from row 0, step 1); TMA only if both allow it, since
    # the kernel has one W_TMA switch. split_k keeps pointer loads (dX's w1ᵀ has no unit inner stride anyway).
    tensors = (w,) if w3 is None else (w, w3)
    tma_slices = ((0, 1),) if split_w else slices
    use_tma = not split_k and all(
        weight_tma(config, tma_slices, tuple(t.shape), t.stride(), t.element_size(), device_capability(t.device))
        and t.data_ptr() % 16 == 0 for t in tensors)
    meta = gemm_constexprs(slices=slices, activation=activation, has_bias=bias is not None, gather=gather,
                           num_experts=E, config=config, store_h=h is not None, flat_pairs=plan.flat_pairs,
                           w_tma=use_tma, split_w=split_w, split_k=split_k)

    def descriptor(t):  # t's [E·rows, KDIM] view (`weight_tma` checked it exists), a [BLOCK_N, BLOCK_K] box a load
        return TensorDescriptor(t, [E * t.shape[1], kdim], [t.stride(1), 1], [config.block_n, config.block_k])

    w_arg = descriptor(w) if use_tma else w
    # Never read without a split (the kernel then passes w to both accumulators): w stands in
    w3_arg = (descriptor(w3) if use_tma else w3) if w3 is not None else w_arg
    w3_strides = w3.stride() if w3 is not None else w.stride()
    # Never read: HAS_BIAS=False / STORE_H=False compile the loads and stores away
    bias_arg = bias if bias is not None else c
    bias_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    h_arg = h if h is not None else c
    h_strides = (h.stride(0), h.stride(1)) if h is not None else (0, 0)
    pair_token = plan.pair_token if plan.flat_pairs else plan.sorted_pairs  # sorted_pairs: never read
    # Σ_e cdiv(counts[e], BLOCK_M) <= cdiv(S, BLOCK_M) + E, and never more than S (a tile holds >= 1 row).
    max_tiles = min(S, triton.cdiv(S, config.block_m) + E)
    n_tiles = triton.cdiv(out_cols, config.block_n)
    if config.persistent:
        grid = (min(num_programs(a.device, config), max_tiles * n_tiles),)
    else:
        grid = (max_tiles, n_tiles)
    grouped_gemm_kernel[grid](
        a, w_arg, w3_arg, bias_arg, c, h_arg, plan.counts, plan.offsets, plan.sorted_pairs, pair_token,
        out_cols, kdim, E, K,
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        *w3_strides,
        *bias_strides,
        c.stride(0), c.stride(1),
        *h_strides,
        **meta, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return c
