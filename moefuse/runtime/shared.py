"""The shared expert inside the fused op: a dense MLP over all T tokens, overlapped with the routed experts.

  shared(x) = [sigmoid(x @ gateᵀ) ·] act(x @ W_upᵀ) @ W2ᵀ            x [T, H] → [T, H], in x's dtype

W_up's rows are [shared_w1; shared_w3] (`SharedExpert.up_rows`); the activation reads slices of them, as the
routed experts' does (`MoESpec.activation`). The GEMMs are dense torch matmuls — cuBLAS / MKL are optimal for
a dense MLP over every token — on row views of the weights (never a concatenated copy); the activation is
the spec's expression (`moefuse.expr.torch_fn`) in fp32, its derivative `moefuse.expr.gradient`'s.

On CUDA the shared MLP runs on a side stream while the main stream routes and runs the routed experts
(`overlapped`): the side stream waits for an event recorded after x is ready, the main stream waits for
the side's event before the final add. On the CPU the two run one after the other, with no CUDA call.

The backward (`shared_backward`) recomputes the shared forward from x and keeps nothing: it is called by the
training op's backward `moefuse::moe_bwd`, which is an opaque custom op (autograd does not record inside
it), so the vector-Jacobian product is written out: four dense GEMMs per up-projection slice, two for the
down-projection, two for the gate.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from moefuse import expr as _expr
from moefuse.errors import InputError
from moefuse.spec import SharedExpert, spec_from_key

Tensor = torch.Tensor
R = TypeVar("R")
S = TypeVar("S")


def _f32(t: Tensor) -> Tensor:
    """t in at least fp32 (the activation and its derivative run in fp32; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _up_views(sh: SharedExpert, w1: Tensor, w3: Tensor | None) -> list[tuple[int, tuple]]:
    """Per activation variable: (which weight, 0 = w1 / 1 = w3, and the row index of the rows it reads)."""
    rows = [w1.shape[0]] + ([w3.shape[0]] if w3 is not None else [])
    if sum(rows) != sh.up_rows:
        raise InputError(f"shared expert: up-projection rows {rows} do not add up to {sh.up_rows}; pass "
                         "shared_w1 (and shared_w3) as the model holds them")
    views = []
    for off, step in sh.activation.slices:
        block = 0 if off < rows[0] else 1
        start = off - (0 if block == 0 else rows[0])
        stop = start + step * (sh.intermediate - 1) + 1
        if stop > rows[block]:
            raise InputError(f"shared expert: activation slice ({off}, {step}) crosses shared_w1 / shared_w3")
        views.append((block, (slice(start, stop, step),)))
    return views


def _check(sh: SharedExpert, x: Tensor, w1, w3, w2, gate) -> None:
    H = x.shape[1]
    if w2.shape != (H, sh.intermediate):
        raise InputError(f"shared_w2: expected shape ({H}, {sh.intermediate}), got {tuple(w2.shape)}")
    if sh.gated != (gate is not None):
        raise InputError(f"shared_gate: the spec says gated={sh.gated}; pass shared_gate [1, H] iff gated")
    if gate is not None and gate.shape != (1, H):
        raise InputError(f"shared_gate: expected shape (1, {H}), got {tuple(gate.shape)}")
    for name, w in (("shared_w1", w1), ("shared_w3", w3), ("shared_w2", w2), ("shared_gate", gate)):
        if w is not None and (w.dtype != x.dtype or w.device != x.device):
            raise InputError(f"{name}: expected {x.dtype} on {x.device} like x, got {w.dtype} on {w.device}")


def shared_forward(sh: SharedExpert, x: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                   gate: Tensor | None) -> Tensor:
    """The shared expert's output [T, H] in x's dtype, x [T, H]; weights as in the module docstring."""
    _check(sh, x, w1, w3, w2, gate)
    ws = (w1, w3)
    act = _expr.torch_fn(sh.activation.expr, sh.activation.num_inputs)
    # fp32 activation, like the routed experts' epilogue; the GEMMs accumulate in fp32 in cuBLAS / MKL
    a = act(*(_f32(F.linear(x, ws[b][idx])) for b, idx in _up_views(sh, w1, w3))).to(x.dtype)
    out = F.linear(a, w2)
    if gate is not None:
        out = torch.sigmoid(F.linear(x, gate)) * out
    return out


def shared_forward_for(spec_key: str, x: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                       gate: Tensor | None) -> Tensor:
    """`shared_forward` for the shared expert of a `MoESpec.to_key()` string: what a rewritten graph calls
    (plain torch ops, traced through by AOTAutograd) where no fused op computes it (token rounding's pairs)."""
    return shared_forward(spec_from_key(spec_key).shared, x, w1, w3, w2, gate)


def shared_backward(sh: SharedExpert, dy: Tensor, x: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                    gate: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """(dx, dw1, dw3, dw2, dgate) of `shared_forward` for the output gradient dy [T, H], recomputing the
    forward from x; dw3 / dgate are None without w3 / a gate. Gradients in the inputs' dtypes."""
    _check(sh, x, w1, w3, w2, gate)
    ws = (w1, w3)
    views = _up_views(sh, w1, w3)
    n = sh.activation.num_inputs
    us = [_f32(F.linear(x, ws[b][idx])) for b, idx in views]
    a = _expr.torch_fn(sh.activation.expr, n)(*us).to(x.dtype)
    dy = dy.to(x.dtype)
    dgate = None
    dx = _f32(torch.zeros_like(x))
    if gate is not None:
        z = torch.sigmoid(_f32(F.linear(x, gate)))  # [T, 1]
        o = F.linear(a, w2)
        dz = (_f32(dy) * _f32(o)).sum(-1, keepdim=True) * z * (1 - z)  # d/d(x·gateᵀ)
        dgate = (dz.t() @ _f32(x)).to(gate.dtype)
        dx += dz @ _f32(gate)
        do = (_f32(dy) * z).to(x.dtype)
    else:
        do = dy
    dw2 = (do.t() @ a).to(w2.dtype)
    da = _f32(do @ w2)
    grads = [torch.zeros_like(w1)] + ([torch.zeros_like(w3)] if w3 is not None else [None])
    for (b, idx), d_act in zip(views, _expr.gradient(sh.activation.expr, n)):
        du = (da * _expr.torch_fn(d_act, n)(*us)).to(x.dtype)
        grads[b][idx] += du.t() @ x
        dx += _f32(du @ ws[b][idx])
    return dx.to(x.dtype), grads[0], grads[1], dw2, dgate


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device, created once (streams are pooled by CUDA; creating one per call is cheap
    but keeping one makes the overlap's stream visible as one row in a profiler)."""
    return torch.cuda.Stream(device=device)


def _on_cuda(x: Tensor) -> bool:
    """Whether `overlapped` takes the stream path (a seam: the CPU tests mock the CUDA stream API behind it)."""
    return x.is_cuda


def _tensors(out) -> list[Tensor]:
    """The tensors of a thunk's result: one tensor, or a tuple / list of tensors and Nones (`shared_backward`'s
    gradients)."""
    if isinstance(out, Tensor):
        return [out]
    return [t for t in out if isinstance(t, Tensor)]


def overlapped(x: Tensor, shared: Callable[[], S] | None, routed: Callable[[], R]) -> tuple[R, S | None]:
    """(routed(), shared()) — on CUDA with `shared` on a side stream, concurrently with `routed` on the current
    stream; on the CPU one after the other. `shared` reads only tensors that are ready on the current stream
    when this is called (x, the weights, and the output gradient in backward) and returns a tensor or a tuple
    of tensors and Nones (`shared_forward`'s output, `shared_backward`'s gradients)."""
    if shared is None:
        return routed(), None
    if not _on_cuda(x):
        return routed(), shared()
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    ready = torch.cuda.Event()
    ready.record(main)
    side.wait_event(ready)  # x and the weights were produced on the main stream
    with torch.cuda.stream(side):
        s = shared()
        done = torch.cuda.Event()
        done.record(side)
    r = routed()
    main.wait_event(done)  # the final add (and anything after the op) sees the shared output
    # Every tensor of s was allocated on the side stream and is used (and freed) on the main one: tell the
    # caching allocator, or it could hand that memory to a side-stream allocation before the main stream is
    # done with it. x and the weights need no record: the main stream waits for the side one before anything
    # later can free them.
    for t in _tensors(s):
        t.record_stream(main)
    return r, s
