"""Checks of a layer's tensors against its `MoESpec`, shared by every path (Triton kernels and the CPU plan).

A wrong tensor fails here with its name, the shape or dtype the spec wants and what it got, before any kernel
or torch op could fail with an anonymous message deep inside. Imports nothing of moefuse but the spec (no
Triton), so the CPU path can use it on a machine without Triton.
"""
from __future__ import annotations

import torch

from moefuse.errors import InputError
from moefuse.spec import MoESpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise InputError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, expected: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in expected:
        names = " or ".join(str(d) for d in expected)
        raise InputError(f"{name}: expected dtype {names}, got {tensor.dtype}")


def check_layer_inputs(spec: MoESpec, x, topk_ids, topk_w, w1, w2, b1, b2, w3=None) -> None:
    """The checks the forward and the backward share: shapes, dtypes and devices of the layer's inputs."""
    if x.dim() != 2:
        raise InputError(f"x: expected a 2-D tensor [T, {spec.hidden}], got shape {tuple(x.shape)}")
    T, K = x.shape[0], spec.top_k
    check_shape("x", x, (T, spec.hidden))
    check_shape("topk_ids", topk_ids, (T, K))
    check_shape("topk_w", topk_w, (T, K))
    check_dtype("topk_ids", topk_ids, (torch.int32, torch.int64))
    check_dtype("topk_w", topk_w, tuple(TORCH_DTYPES.values()))
    _check_x_weights(spec, x, w1, w2, b1, b2, w3, {"topk_ids": topk_ids, "topk_w": topk_w})


def check_pairs_inputs(spec: MoESpec, x, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2,
                       w3=None) -> None:
    """As `check_layer_inputs`, for flat pairs: pair_token/pair_expert/pair_weight [S_max] (any S_max) and
    token_offsets [T + 1], int32 or int64 ids."""
    if x.dim() != 2:
        raise InputError(f"x: expected a 2-D tensor [T, {spec.hidden}], got shape {tuple(x.shape)}")
    T = x.shape[0]
    check_shape("x", x, (T, spec.hidden))
    if pair_expert.dim() != 1:
        raise InputError(f"pair_expert: expected a 1-D tensor [S_max], got shape {tuple(pair_expert.shape)}")
    S = pair_expert.shape[0]
    check_shape("pair_token", pair_token, (S,))
    check_shape("pair_weight", pair_weight, (S,))
    check_shape("token_offsets", token_offsets, (T + 1,))
    for name, ids in (("pair_token", pair_token), ("pair_expert", pair_expert), ("token_offsets", token_offsets)):
        check_dtype(name, ids, (torch.int32, torch.int64))
    check_dtype("pair_weight", pair_weight, tuple(TORCH_DTYPES.values()))
    _check_x_weights(spec, x, w1, w2, b1, b2, w3, {"pair_token": pair_token, "pair_expert": pair_expert,
                                               "pair_weight": pair_weight, "token_offsets": token_offsets})


def _check_x_weights(spec: MoESpec, x, w1, w2, b1, b2, w3, routing: dict[str, torch.Tensor]) -> None:
    """Shapes and dtypes of x, the weights and the biases; devices of those and of the routing tensors."""
    E, H, I, N1 = spec.num_experts, spec.hidden, spec.intermediate, spec.up_rows  # noqa: E741
    dtype = TORCH_DTYPES[spec.dtype]
    if (w3 is not None) != spec.w3:
        raise InputError(
            "w3: the spec holds gate and up as two tensors (MoESpec.w3=True) but w3 is None: pass the up weights "
            "[E, I, H] as w3" if spec.w3 else
            "w3: given, but the spec's up-projection is the one tensor w1 (MoESpec.w3=False): pass w3=None, or "
            "a spec with w3=True"
        )
    if w3 is not None:
        # the up-projection's N1 = 2·I rows are virtual: I in w1 (the gate), I in w3 (the up)
        check_shape("w1", w1, (E, I, H))
        check_shape("w3", w3, (E, I, H))
        check_dtype("w3", w3, (dtype,))
    else:
        check_shape("w1", w1, (E, N1, H))
    check_shape("w2", w2, (E, H, I))
    check_dtype("x", x, (dtype,))
    check_dtype("w1", w1, (dtype,))
    check_dtype("w2", w2, (dtype,))
    for name, bias, wanted, shape in (("b1", b1, spec.w1_bias, (E, N1)), ("b2", b2, spec.w2_bias, (E, H))):
        if (bias is not None) != wanted:
            raise InputError(f"{name}: the spec says w{name[1]}_bias={wanted} but {name} is "
                             f"{'given' if bias is not None else 'None'}")
        if bias is not None:
            check_shape(name, bias, shape)
            check_dtype(name, bias, tuple(TORCH_DTYPES.values()))
    tensors = {"x": x, **routing, "w1": w1, "w3": w3, "w2": w2, "b1": b1, "b2": b2}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != x.device:
            raise InputError(f"{name}: expected device {x.device} (that of x), got {tensor.device}")
