"""Verification probes what will run: the fused op through its own dispatch on the captured device (the Triton
kernels under TRITON_INTERPRET=1 here, as on CUDA; the CPU path — generated C++ or torch plan — on other CPUs),
forward and — for a region that needs gradients — backward. A region the kernels of that device would refuse or
compute differently is never reported verified."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moefuse import Backend
from moefuse.compiler import verify as ver
from moefuse.passes.region import Reason
from moefuse.runtime import op as moe_op
from moefuse.testing import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoE  # noqa: E402


class DoubleRead(SimpleMoE):
    """A non-GLU expert whose activation reads the same slice twice: silu(h[..., :I]) · h[..., :I] — slices
    ((0, 1), (0, 1)), which the Triton forward runs but the Triton backward refuses (it writes each dH row
    from one input)."""

    def __init__(self, hidden, intermediate, num_experts, top_k):
        super().__init__(hidden, intermediate, num_experts, top_k, glu=False)
        self.inter = intermediate

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        h = torch.einsum("th,enh->ten", x, self.w1)
        a = F.silu(h[..., :self.inter]) * h[..., :self.inter]
        y = torch.einsum("ten,ehn->teh", a, self.w2)
        dense = torch.zeros_like(probs).scatter(1, ids, weights)
        return (y * dense.unsqueeze(-1)).sum(dim=1)


@pytest.fixture
def fresh(monkeypatch):
    """dynamo's caches and the verified-signature cache empty before and after."""
    monkeypatch.setattr(ver, "_VERIFIED", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def interpreter(monkeypatch, on: bool):
    if on:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def compile_step(model, x, train: bool):
    """(output, gradients of the parameters or None, explanation) of one compiled step."""
    backend = Backend({"inner": "eager"})
    model.requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = torch.compile(model, backend=backend)(x)
        grads = None
        if train:
            out.square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
    return out.detach(), grads, backend.explanation


def eager_step(model, x, train: bool):
    with torch.set_grad_enabled(train):
        out = model(x)
        grads = None
        if train:
            out.square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
    return out.detach(), grads


def tiny(cls=SimpleMoE, **kw):
    torch.manual_seed(0)
    return cls(32, 16, 4, 2, **kw), torch.randn(6, 32)


# ---------------------------------------------------------------------------------------------------------
# The double-read activation: lowered where its path runs it, refused (with the reason) where it does not
# ---------------------------------------------------------------------------------------------------------


def test_double_read_activation_training_on_triton_is_refused_with_the_reason(monkeypatch, fresh):
    """Under the interpreter (as on CUDA) the training op's backward would raise: the region is rejected at
    compile time with the kernel's reason, the model runs unchanged, and its gradients are eager's. (It was
    lowered and "verified" against the CPU plan, then the first backward raised ValueError.)"""
    interpreter(monkeypatch, True)
    model, x = tiny(DoubleRead)
    out, grads, explanation = compile_step(model, x, train=True)
    assert not explanation.lowered, str(explanation)
    (rejection,) = explanation.rejected
    assert rejection.reason == Reason.UNSUPPORTED_ACTIVATION and "twice" in str(rejection), str(rejection)
    want, want_grads = eager_step(model, x, train=True)
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_double_read_refused_with_verification_off(monkeypatch, fresh):
    """The refusal is a kernel limitation, not a probe result: MOEFUSE_VERIFY=0 does not let the region through
    to a backward that would raise."""
    interpreter(monkeypatch, True)
    model, x = tiny(DoubleRead)
    backend = Backend({"inner": "eager", "verify": False})
    model.requires_grad_(True)
    out = torch.compile(model, backend=backend)(x)
    out.sum().backward()  # eager's backward: the layer was left alone
    assert not backend.explanation.lowered
    assert [r.reason for r in backend.explanation.rejected] == [Reason.UNSUPPORTED_ACTIVATION]


@pytest.mark.parametrize("path", ["interpreter_inference", "cpu_training"])
def test_double_read_activation_lowered_where_it_runs(path, monkeypatch, fresh):
    """The Triton forward runs the double read (inference under the interpreter), and the CPU plan runs its
    backward too (training without the interpreter): lowered, verified, and eager's numbers."""
    interpreter(monkeypatch, path == "interpreter_inference")
    train = path == "cpu_training"
    model, x = tiny(DoubleRead)
    out, grads, explanation = compile_step(model, x, train=train)
    (layer,) = explanation.lowered
    assert not explanation.rejected and layer.verify_error is not None, str(explanation)
    assert layer.spec.activation.slices == ((0, 1), (0, 1))
    want, want_grads = eager_step(model, x, train=train)
    assert rel_err(out, want) <= 1e-5
    for a, b in zip(grads or [], want_grads or []):
        assert rel_err(a, b) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# The probe runs the dispatch that will run, forward and backward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("on", [True, False], ids=["interpreter", "cpu"])
def test_probe_runs_the_path_of_the_device(on, train, monkeypatch, fresh):
    """During compilation (before the model's first call) verification ran the Triton forward under the
    interpreter and the CPU plan without it — and, for training, that path's backward; the model's counters
    do not include the probe's calls."""
    from moefuse.kernels import backward as kbwd
    from moefuse.runtime import autograd as autograd_rt
    from moefuse.runtime import cpu, triton_path

    interpreter(monkeypatch, on)
    ran = []
    for mod, name in ((triton_path, "moe_forward_triton"), (cpu, "moe_forward_cpu"), (kbwd, "moe_backward"),
                      (autograd_rt, "moe_backward_cpu")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    monkeypatch.setattr(autograd_rt, "moe_forward_cpu", cpu.moe_forward_cpu)  # the training op's, spied too
    model, x = tiny()
    before = dict(moe_op.counters)
    backend = Backend({"inner": "eager"})
    model.requires_grad_(train)
    with torch.set_grad_enabled(train):
        compiled = torch.compile(model, backend=backend)
        gm_calls = []  # what had run when the backend returned: verification's calls
        real_pipeline = Backend.__call__

        def spy(self, *a, **k):
            result = real_pipeline(self, *a, **k)
            gm_calls.append(list(ran))
            return result

        monkeypatch.setattr(Backend, "__call__", spy)
        out = compiled(x)
        if train:
            out.sum().backward()
    (during_compile,) = gm_calls
    forward = "moe_forward_triton" if on else "moe_forward_cpu"
    backward = "moe_backward" if on else "moe_backward_cpu"
    assert forward in during_compile
    assert (backward in during_compile) == train
    (layer,) = backend.explanation.lowered
    assert layer.verify_error is not None and layer.training == train
    calls = {k: v - before[k] for k, v in moe_op.counters.items() if v != before[k]}
    op = ("fwd_train_" if train else "") + ("triton" if on else "cpu")
    assert calls.get(op) == 1, calls  # the model's one call; the probe's are not counted


@pytest.mark.parametrize("wrong", ["forward", "backward"])
def test_a_kernel_that_computes_differently_is_caught(wrong, monkeypatch, fresh):
    """A Triton path that differs from the captured region — here made to, in its forward or in one gradient —
    is rejected by verification under the interpreter, while the CPU plan (what the old probe ran) is right."""
    from moefuse.kernels import backward as kbwd
    from moefuse.runtime import triton_path

    interpreter(monkeypatch, True)
    if wrong == "forward":
        real = triton_path.moe_forward
        monkeypatch.setattr(triton_path, "moe_forward", lambda *a, **k: _scaled(real(*a, **k)))
    else:
        real = kbwd.moe_backward
        monkeypatch.setattr(kbwd, "moe_backward", lambda *a, **k: (real(*a, **k)[0] * 1.5, *real(*a, **k)[1:]))
    model, x = tiny()
    _, _, explanation = compile_step(model, x, train=wrong == "backward")
    assert not explanation.lowered, str(explanation)
    (rejection,) = explanation.rejected
    assert rejection.reason == Reason.VERIFY_MISMATCH, str(rejection)
    if wrong == "backward":
        assert "gradient" in str(rejection), str(rejection)


def _scaled(out):
    if isinstance(out, tuple):
        return (out[0] * 1.5, *out[1:])
    return out * 1.5


# ---------------------------------------------------------------------------------------------------------
# Half-precision regions: the bound follows the captured region's own error, not a fixed number
# ---------------------------------------------------------------------------------------------------------


def test_half_precision_check_is_derived():
    """fp16: the fused op passes within 3× the captured region's own error against its fp32 run (+ 2 output
    roundings) and is rejected beyond — whatever that error is, so a fixed 2e-2 can no longer reject a correct
    layer on one CPU (0.0223) and pass it on another."""
    from types import SimpleNamespace

    from moefuse.passes.region import Reject
    from moefuse.tolerance import UNIT_ROUNDOFF

    region = SimpleNamespace(output=SimpleNamespace(name="y"), spec=SimpleNamespace(dtype="float16"))
    wide = torch.linspace(-1, 1, 64)
    u = UNIT_ROUNDOFF[torch.float16]
    for eager_err in (0.03, 1e-3):  # a captured region with a large error, and one with a small one
        captured = (wide + eager_err).half()
        err_captured = (captured.double() - wide.double()).abs().max().item()
        bound = 3 * err_captured + 2 * u
        ver._check(region, captured, (wide + 0.8 * bound).half(), "test", wide)  # inside (after fp16 rounding): passes
        with pytest.raises(Reject, match="3× the captured region's own error"):
            ver._check(region, captured, (wide + 1.2 * bound).half(), "test", wide)
    # an fp16 region that cannot run in fp32 falls back to the table
    ver._check(region, wide.half(), (wide + 0.01).half(), "test", None)
    with pytest.raises(Reject, match="relative error"):
        ver._check(region, wide.half(), (wide + 0.05).half(), "test", None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_training_region_verified(dtype, monkeypatch, fresh):
    """A half-precision training region through the interpreter: forward and every gradient checked against the
    captured region's fp32 run, lowered, and its gradients within eager's bound."""
    from moefuse.testing import assert_parity, fp32_twin

    interpreter(monkeypatch, True)
    model, x = tiny()
    model = model.to(dtype)
    x = x.to(dtype)
    out, grads, explanation = compile_step(model, x, train=True)
    (layer,) = explanation.lowered
    assert layer.training and layer.verify_error is not None, str(explanation)
    want, want_grads = eager_step(model, x, train=True)
    ref, ref_grads = eager_step(fp32_twin(model), x.float(), train=True)
    assert_parity(out, want, ref, dtype, what="y")
    for g, w, r in zip(grads, want_grads, ref_grads):
        assert_parity(g, w, r, dtype)
