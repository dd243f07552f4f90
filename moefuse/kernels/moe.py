"""The forward of one MoE layer on Triton kernels: routing plan → up GEMM → down GEMM → combine.

  plan = routing_plan(topk_ids, E)                               counts, offsets, sorted_pairs, pair_pos
  A    = act(gather(x) · w1[e]ᵀ + b1[e])      [S, I]  dtype of x  (gather inside the load, GLU in the epilogue;
                                                                  with `MoESpec.w3`, w1[e] is the virtual [w1; w3][e])
  Y    = A · w2[e]ᵀ + b2[e]                   [S, H]  dtype of x  (expert-sorted order)
  y    = Σ_k topk_w[t, k] · Y[pair_pos[t·K + k]]  [T, H]  spec.out_dtype, summed in fp32

Flat pairs (`moe_pairs_forward`: a variable number of experts per token, see `moefuse.runtime.pairs`) run the
same launches on `routing.flat_pairs_plan`: the gather reads x row pair_token[p], the combine sums each token's
pairs token_offsets[t] .. token_offsets[t+1]; every other step is unchanged.

With save_h, the up GEMM's epilogue also stores its pre-activation accumulators H [S, N1] (sorted order, bias
included), which is all the memory-efficient backward (`moefuse.kernels.backward`) needs besides x and ids.

Every step runs on the device without a host sync. `kernel_sources` lists the same kernels with the same
specialisations, for compile-only builds on a machine without a GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from triton.compiler import ASTSource
from triton.runtime.jit import KernelInterface

from moefuse.kernels import routing
from moefuse.kernels.combine import NUM_WARPS as COMBINE_WARPS
from moefuse.kernels.combine import combine, combine_block_h, combine_kernel
from moefuse.kernels.grouped_gemm import (
    GemmConfig,
    gemm_constexprs,
    grouped_gemm,
    grouped_gemm_kernel,
    identity,
    weight_tma,
)
from moefuse.kernels.routing import RoutingMeta, flat_pairs_plan, routing_plan
from moefuse.errors import InputError
from moefuse.inputs import TORCH_DTYPES, check_layer_inputs, check_pairs_inputs
from moefuse.spec import MoESpec

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64"}


def check_triton_device(x: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"x: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}; "
                         "move the layer to a GPU, or leave TRITON_INTERPRET unset so CPU tensors take the torch plan")


def moe_forward(
    spec: MoESpec,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: KernelInterface,
    config: GemmConfig | None = None,
    save_h: bool = False,
    w3: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y [T, H] in spec.out_dtype for the layouts of `moefuse.spec` (any strides).

    activation: a @triton.jit function of spec.activation.num_inputs fp32 tiles, applied in the up-projection's
    epilogue. config: tile config of both GEMMs (default: `GemmConfig.default(dtype)`).
    save_h: return (y, h) instead, h [T·K, N1] in x's dtype: row r is sorted position r of the routing plan
    (pair plan.sorted_pairs[r]), column c the pre-activation up-projection row c, b1 included. Rows of dropped
    pairs, and columns no activation slice reads, are unspecified.
    w3: the up weights [E, I, H] of a spec with `MoESpec.w3` (w1 [E, I, H] is the gate's); the up GEMM reads
    the two tensors where they lie (SPLIT_W) and h keeps the layout of the virtual [w1; w3].
    """
    check_layer_inputs(spec, x, topk_ids, topk_w, w1, w2, b1, b2, w3)
    check_triton_device(x)
    check_activation(activation)
    plan = routing_plan(topk_ids, spec.num_experts) if x.shape[0] else None
    return _forward_on_plan(spec, x, plan, topk_w, w1, w2, b1, b2, activation, config, save_h, w3,
                            num_pairs=x.shape[0] * spec.top_k)


def moe_pairs_forward(
    spec: MoESpec,
    x: torch.Tensor,
    pair_token: torch.Tensor,
    pair_expert: torch.Tensor,
    pair_weight: torch.Tensor,
    token_offsets: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: KernelInterface,
    config: GemmConfig | None = None,
    save_h: bool = False,
    w3: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`moe_forward` on flat pairs (the contract of `moefuse.runtime.pairs`): y [T, H], y[t] = Σ over pairs p
    of t (token_offsets[t] .. token_offsets[t+1]) of pair_weight[p] · expert pair_expert[p] applied to x[t].

    pair_token, pair_expert, pair_weight [S_max], token_offsets [T + 1]; slots with pair_expert outside [0, E)
    (−1: unused) contribute nothing. save_h: h is [S_max, N1], rows in the plan's sorted order as in
    `moe_forward`. No host sync: S_max, not the used count, sizes every buffer and grid.
    """
    check_pairs_inputs(spec, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, w3)
    check_triton_device(x)
    check_activation(activation)
    plan = flat_pairs_plan(pair_token, pair_expert, token_offsets, spec.num_experts) if x.shape[0] else None
    return _forward_on_plan(spec, x, plan, pair_weight.unsqueeze(1), w1, w2, b1, b2, activation, config, save_h, w3,
                            num_pairs=pair_expert.shape[0])


def check_activation(activation) -> None:
    if not isinstance(activation, KernelInterface):
        raise ValueError(f"activation: expected a @triton.jit function, got {type(activation).__name__}")


def _forward_on_plan(spec: MoESpec, x, plan, weights, w1, w2, b1, b2, activation, config, save_h, w3, *,
                     num_pairs):
    """The launches of both forms; weights [T, K] or [S, 1] as the plan's combine reads them; plan is None
    when T = 0 (nothing to launch)."""
    H, I, N1 = spec.hidden, spec.intermediate, spec.up_rows  # noqa: E741
    dtype, out_dtype = TORCH_DTYPES[spec.dtype], TORCH_DTYPES[spec.out_dtype]

    # ---- Allocate / launch ----
    h = torch.empty(num_pairs, N1, dtype=dtype, device=x.device) if save_h else None
    if plan is None:
        y = torch.empty(0, H, dtype=out_dtype, device=x.device)
        return (y, h) if save_h else y
    a = grouped_gemm(x, w1, plan, out_cols=I, slices=spec.activation.slices, activation=activation, bias=b1,
                     gather=True, h=h, config=config, w3=w3)
    y_sorted = grouped_gemm(a, w2, plan, out_cols=H, bias=b2, config=config)
    y = combine(y_sorted, weights, plan, out_dtype=out_dtype)
    return (y, h) if save_h else y


# ---------------------------------------------------------------------------------------------------------
# Compile-only builds
# ---------------------------------------------------------------------------------------------------------


# Sizes and outer strides that are multiples of 16 whenever H, I and N1 are (every real model); not the ones
# that scale with TOP_K or E.
FORWARD_ALIGNED_INTS = frozenset({"N", "KDIM", "H", "stride_am", "stride_we", "stride_wn", "stride_w3e", "stride_w3n",
                                  "stride_w3k", "stride_be", "stride_cm", "stride_hm", "stride_ym", "stride_ot"})


@dataclass(frozen=True)
class KernelSource:
    """One kernel specialisation as `moe_forward` launches it: what `triton.compile(ASTSource(fn, signature,
    constexprs), target, options={"num_warps": ..., "num_stages": ...})` needs."""

    name: str
    fn: KernelInterface
    signature: dict[str, str]  # argument name -> "*fp16" / "i32" / "constexpr" …
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    aligned_ints: frozenset[str] = FORWARD_ALIGNED_INTS  # int arguments specialised as divisible by 16

    @property
    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    @property
    def attrs(self) -> dict[tuple[int, ...], list]:
        """Divisibility by 16 of every pointer and of the H/I-sized ints, as a launch on aligned tensors with
        H, I multiples of 16 specialises them. Without it the K-mask has no known constancy, Triton cannot
        vectorise the loads into the >= 4-byte cp.async copies that software pipelining is built from, and
        num_stages is silently ignored (measured: 16 KiB shared, no cp.async, on sm_80 fp16)."""
        arg_names = self.fn.arg_names
        return {
            (arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in self.signature.items()
            if kind.startswith("*") or (kind == "i32" and name in self.aligned_ints)
        }

    def ast_source(self) -> ASTSource:
        return ASTSource(self.fn, self.signature, self.constexprs, self.attrs)


def gemm_signature(ptr: str) -> dict[str, str]:
    """The runtime arguments of `grouped_gemm_kernel` with operands of pointer type `ptr` ("*fp16" …)."""
    return {"a_ptr": ptr, "w_ptr": ptr, "w3_ptr": ptr, "bias_ptr": ptr, "c_ptr": ptr, "h_ptr": ptr,
            "counts_ptr": "*i32", "offsets_ptr": "*i32", "sorted_pairs_ptr": "*i32", "pair_token_ptr": "*i32",
            "N": "i32", "KDIM": "i32", "E": "i32", "TOP_K": "i32", "stride_am": "i32", "stride_we": "i32",
            "stride_wn": "i32", "stride_w3e": "i32", "stride_w3n": "i32", "stride_be": "i32", "stride_cm": "i32",
            "stride_hm": "i32"}


def with_constexprs(runtime_args: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    return {**runtime_args, **{name: "constexpr" for name in constexprs}}


def kernel_sources(
    spec: MoESpec,
    activation: KernelInterface,
    config: GemmConfig | None = None,
    ids_dtype: torch.dtype = torch.int32,
    save_h: bool = False,
    flat_pairs: bool = False,
    capability: int = 90,
) -> list[KernelSource]:
    """Every kernel `moe_forward(spec, …, activation=activation, config=config, save_h=save_h)` launches, in
    launch order; with flat_pairs, those of `moe_pairs_forward` (the routing kernels are the same: they sort
    pair_expert as a [S_max, 1] top-k).

    Inner strides are fixed to 1 as constexprs, which is how Triton specialises a launch on contiguous
    tensors (and what lets it vectorise the loads). capability (10·major + minor) is the GPU the launch would
    run on: with config.tma it decides, as the launch does (`weight_tma`, contiguous weights), whether a GEMM's
    w_ptr is a tensor descriptor."""
    dtype, out_dtype = TORCH_DTYPES[spec.dtype], TORCH_DTYPES[spec.out_dtype]
    config = config or GemmConfig.default(dtype)
    E = spec.num_experts
    ptr, out_ptr, ids_ptr, i32p = POINTER_TYPES[dtype], POINTER_TYPES[out_dtype], POINTER_TYPES[ids_dtype], "*i32"
    sources = []

    # ---- Routing ----
    meta = RoutingMeta.for_experts(E)
    warps = routing.NUM_WARPS
    sizes = {"S": "i32", "E": "i32", "TOP_K": "i32"}
    hist_consts = {"stride_ik": 1, "BLOCK_S": meta.block_s, "BLOCK_E": meta.block_e}
    sources.append(KernelSource(
        "routing_histogram", routing.routing_histogram_kernel,
        with_constexprs({"topk_ids_ptr": ids_ptr, "hist_ptr": i32p, **sizes, "stride_it": "i32"}, hist_consts),
        hist_consts, warps, 1))
    scan_consts = {"BLOCK_B": meta.block_b, "BLOCK_C": meta.block_c}
    sources.append(KernelSource(
        "routing_scan", routing.routing_scan_kernel,
        with_constexprs({"hist_ptr": i32p, "block_start_ptr": i32p, "totals_ptr": i32p, "NB": "i32", "E": "i32"},
                         scan_consts),
        scan_consts, warps, 1))
    sources.append(KernelSource(
        "routing_scatter", routing.routing_scatter_kernel,
        with_constexprs({"topk_ids_ptr": ids_ptr, "block_start_ptr": i32p, "totals_ptr": i32p, "offsets_ptr": i32p,
                          "sorted_pairs_ptr": i32p, "pair_pos_ptr": i32p, **sizes, "stride_it": "i32"}, hist_consts),
        hist_consts, warps, 1))

    # ---- Grouped GEMMs: up (gather + activation), down (identity) ----
    # With spec.w3 the up GEMM reads w1 and w3, each [E, I, H] (SPLIT_W); w3_ptr is dead code otherwise.
    unit_strides = {"stride_ak": 1, "stride_wk": 1, "stride_w3k": 1, "stride_bn": 1, "stride_cn": 1, "stride_hn": 1}
    up_rows = spec.intermediate if spec.w3 else spec.up_rows  # rows of the tensor w1 (and w3)
    for name, w_shape, kwargs in (
        ("up_gemm", (E, up_rows, spec.hidden),
         dict(slices=spec.activation.slices, activation=activation, has_bias=spec.w1_bias, gather=True,
              store_h=save_h, flat_pairs=flat_pairs, split_w=spec.w3)),
        ("down_gemm", (E, spec.hidden, spec.intermediate),
         dict(slices=((0, 1),), activation=identity, has_bias=spec.w2_bias, gather=False, flat_pairs=flat_pairs)),
    ):
        w_strides = (w_shape[1] * w_shape[2], w_shape[2], 1)  # contiguous
        # as the launch decides: a split tensor is read from row 0, step 1
        tma_slices = ((0, 1),) if kwargs.get("split_w") else kwargs["slices"]
        w_tma = weight_tma(config, tma_slices, w_shape, w_strides, dtype.itemsize, capability)
        consts = {**unit_strides, **gemm_constexprs(**kwargs, num_experts=E, config=config, w_tma=w_tma)}
        signature = gemm_signature(ptr)
        if w_tma:  # how Triton types a TensorDescriptor argument
            signature["w_ptr"] = f"tensordesc<{ptr[1:]}[{config.block_n}, {config.block_k}]>"
            if kwargs.get("split_w"):
                signature["w3_ptr"] = signature["w_ptr"]
        sources.append(KernelSource(name, grouped_gemm_kernel, with_constexprs(signature, consts), consts,
                                    config.num_warps, config.num_stages))

    # ---- Combine ----
    sources.append(combine_source("combine", ptr, out_ptr, spec.hidden, weighted=True, flat_pairs=flat_pairs))
    return sources


def combine_source(name: str, ptr: str, out_ptr: str, hidden: int, *, weighted: bool,
                   flat_pairs: bool = False) -> KernelSource:
    """`combine_kernel` as `combine` launches it on rows of pointer type `ptr`, writing `out_ptr`."""
    consts = {"stride_yh": 1, "stride_oh": 1, "WEIGHTED": weighted, "FLAT_PAIRS": flat_pairs,
              "BLOCK_H": combine_block_h(hidden)}
    signature = {"y_ptr": ptr, "topk_w_ptr": "*fp32" if weighted else ptr, "pair_pos_ptr": "*i32",
                 "offsets_ptr": "*i32", "token_offsets_ptr": "*i32", "out_ptr": out_ptr, "H": "i32", "E": "i32",
                 "TOP_K": "i32", "stride_ym": "i32", "stride_wt": "i32", "stride_wk": "i32", "stride_ot": "i32"}
    return KernelSource(name, combine_kernel, with_constexprs(signature, consts), consts, COMBINE_WARPS, 1)
