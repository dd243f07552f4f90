"""Shared experts inside the fused op (Qwen2-MoE's sigmoid-gated one, DeepSeek-V3's plain one, Llama4's,
which its routed experts' input scaling does not reach and which the routed output is added to in place).

Each test asserts that the shared expert really moved into the op (the report says so, and no shared-expert
matmul is left in the graph the inner compiler receives) AND that logits and gradients match eager.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moefuse import Backend
from moefuse.compiler import backend as backend_mod
from moefuse.passes import fxutil as fu
from moefuse.runtime import op as moe_op
from moefuse.runtime import shared as shared_rt
from moefuse.spec import Activation, MoESpec, SharedExpert
from moefuse.testing import assert_model_parity, fp32_twin, num_moe_layers, rel_err, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoE  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_path")

TOL = {torch.float32: 1e-4}  # fp32 relative error; fp16 by moefuse.testing.assert_model_parity (derived)
GATED = {"qwen2_moe": True, "deepseek_v3": False, "llama4": False}
# shared_expert_intermediate_size; moe_intermediate_size × n_shared_experts; intermediate_size
SHARED_I = {"qwen2_moe": 48, "deepseek_v3": 32, "llama4": 32}


@pytest.fixture
def inner_graphs(monkeypatch):
    """The graphs moefuse hands to the inner compiler, after its rewrite."""
    graphs = []
    real = backend_mod._inner_compile

    def spy(gm, example_inputs, inner):
        graphs.append(gm)
        return real(gm, example_inputs, inner)

    monkeypatch.setattr(backend_mod, "_inner_compile", spy)
    return graphs


def assert_shared_inside(explanation, graphs, family):
    """Every layer lowered with its shared expert in the spec and the report, and no linear over a shared-expert
    weight left in the rewritten graphs: the op reads those weights instead."""
    assert not explanation.rejected and len(explanation.lowered) == 2, str(explanation)
    gated = "gated" if GATED[family] else "ungated"
    for layer in explanation.lowered:
        assert layer.spec.shared == SharedExpert(SHARED_I[family], 2 * SHARED_I[family],
                                                 Activation("x0*x1*sigmoid(x0)", ((0, 1), (SHARED_I[family], 1))),
                                                 GATED[family]), str(layer)
        assert f"shared expert: {gated}, I={SHARED_I[family]}" in str(layer) and "side stream (CUDA)" in str(layer)
    ops = linears = 0
    for gm in graphs:
        for n in gm.graph.nodes:
            if fu.op_name(n) == "F.linear":
                linears += any("shared_expert" in a.name for a in n.all_input_nodes)
            if fu.op_name(n).startswith("moefuse::moe"):
                ops += any("shared_expert" in a.name for a in n.all_input_nodes)
    assert (ops, linears) == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("family", sorted(GATED))
def test_shared_expert_inside_the_op_logits_match(family, dtype, inner_graphs):
    model = tiny_model(family, dtype)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        backend = Backend({"inner": "eager"})
        before = moe_op.counters["cpu"]
        out = torch.compile(model, backend=backend)(ids).logits
    assert moe_op.counters["cpu"] - before == num_moe_layers(model) == 2
    assert_shared_inside(backend.explanation, inner_graphs, family)
    with torch.no_grad():
        ref32 = fp32_twin(model)(ids).logits if dtype != torch.float32 else None
    assert_model_parity(out, ref, ref32, dtype, TOL[torch.float32])


def test_verification_probes_the_shared_expert(monkeypatch):
    """Were detection to misread the shared expert (here: forced to swap its gate and up), the probe, which runs
    the whole region, rejects the layer: it runs unchanged rather than wrong."""
    import dataclasses

    from moefuse.passes import assemble as det

    real = det._shared_expert

    def swapped(*args):
        found = real(*args)
        if found is None:
            return None
        branch, sh, add = found
        act = Activation(sh.activation.expr, tuple(reversed(sh.activation.slices)))
        return branch, dataclasses.replace(sh, activation=act), add

    monkeypatch.setattr(det, "_shared_expert", swapped)
    model = tiny_model("qwen2_moe")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
        backend = Backend({"inner": "eager"})
        out = torch.compile(model, backend=backend)(ids).logits
    assert {r.reason.name for r in backend.explanation.rejected} == {"VERIFY_MISMATCH"}
    assert not backend.explanation.lowered
    assert torch.equal(out, ref)


def loss_of(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, ids)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                           for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["cpu", "interpreter"])
@pytest.mark.parametrize("family", sorted(GATED))
def test_training_step_gradients_match_eager(family, path, inner_graphs, monkeypatch):
    """One training step: the fused forward and backward run (the shared expert's gradients from moe_bwd), and
    every parameter's gradient — the shared expert's and its gate's included — matches eager's."""
    if path == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model(family).train()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = grads(model, ids)
    backend = Backend({"inner": "eager"})
    suffix = "triton" if path == "interpreter" else "cpu"
    before = dict(moe_op.counters)
    loss, got = grads(torch.compile(model, backend=backend), ids)
    ran = {k: moe_op.counters[k] - before[k] for k in (f"fwd_train_{suffix}", f"bwd_{suffix}")}
    assert ran == {f"fwd_train_{suffix}": 2, f"bwd_{suffix}": 2}
    assert all(r.training for r in backend.explanation.lowered)
    assert_shared_inside(backend.explanation, inner_graphs, family)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert got.keys() == ref.keys()
    shared = [n for n in ref if "shared_expert" in n]
    assert len(shared) == (8 if GATED[family] else 6)  # gate/up/down (+ the sigmoid gate) in each of 2 layers
    worst = max(ref, key=lambda n: rel_err(got[n], ref[n]))
    assert rel_err(got[worst], ref[worst]) <= 1e-4, worst


class SharedMoE(torch.nn.Module):
    """A hand-written MoE with a plain (non-GLU, one up linear) GELU shared expert; `leak` returns the shared
    expert's hidden activation too, so its interior is used outside the MoE block."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.moe = SimpleMoE(32, 16, 4, 2)
        self.up = torch.nn.Linear(32, 24, bias=False)
        self.down = torch.nn.Linear(24, 32, bias=False)
        self.leak = leak

    def forward(self, x):
        h = self.up(x)
        y = self.moe(x) + self.down(F.gelu(h))
        return (y, h) if self.leak else y


@pytest.mark.parametrize("leak", [False, True], ids=["inside", "interior_used_outside"])
def test_handwritten_shared_expert(leak):
    """A single up-projection with a GELU (the activation lifted like the routed experts'); when the shared
    expert's hidden value escapes, the region keeps its routed part and the shared MLP stays in the graph."""
    torch.manual_seed(0)
    model = SharedMoE(leak)
    x = torch.randn(11, 32)
    with torch.no_grad():
        ref = model(x)
        backend = Backend({"inner": "eager"})
        out = torch.compile(model, backend=backend)(x)
    (layer,) = backend.explanation.lowered
    if leak:
        assert layer.spec.shared is None and "shared expert" not in str(layer)
    else:
        assert layer.spec.shared == SharedExpert(24, 24, Activation("x0*(erf(sqrt(2)*x0/2) + 1)/2", ((0, 1),)))
    for a, b in zip(out if leak else [out], ref if leak else [ref]):
        assert rel_err(a, b) <= TOL[torch.float32]


def shared_problem(device="cpu", T=13, H=32, I=16, E=4, K=2, Is=24):  # noqa: E741
    g = torch.Generator().manual_seed(0)
    sh = SharedExpert(Is, 2 * Is, Activation("x0*x1*sigmoid(x0)", ((0, 1), (Is, 1))), gated=True)
    spec = MoESpec(E, K, H, I, 2 * I, Activation("x0*x1*sigmoid(x0)", ((0, 1), (I, 1))), "float32", "float32",
                   shared=sh)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = rand(T, H)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].to(device)
    w = torch.rand(T, K, generator=g).to(device)
    routed = (rand(E, 2 * I, H, scale=H**-0.5), rand(E, H, I, scale=I**-0.5))
    shared = (rand(Is, H, scale=H**-0.5), rand(H, Is, scale=Is**-0.5), rand(1, H, scale=H**-0.5),
              rand(Is, H, scale=H**-0.5))  # shared_w1, shared_w2, shared_gate, shared_w3: the op's order
    return spec, x, ids, w, routed, shared


def test_cpu_path_is_sequential_without_cuda_calls(monkeypatch):
    """On the CPU the op runs the shared MLP after the routed experts: no stream, event or CUDA query at all."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA call on the CPU path")

    spec, x, ids, w, (w1, w2), shared = shared_problem()
    with monkeypatch.context() as m:  # only around the op: teardown code may query CUDA
        for name in ("Stream", "Event", "current_stream", "stream", "is_available", "synchronize"):
            m.setattr(torch.cuda, name, no_cuda)
        y = torch.ops.moefuse.moe(x, ids, w, w1, w2, None, None, spec.to_key(), *shared)
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, *shared)]  # the training pair, too
        y_train, _ = torch.ops.moefuse.moe_fwd(leaves[0], ids, w, *leaves[1:3], None, None, spec.to_key(), *leaves[3:])
        y_train.sum().backward()
    routed = torch.ops.moefuse.moe(x, ids, w, w1, w2, None, None, spec.routed().to_key())
    sw1, sw2, gate, sw3 = shared
    want = routed + torch.sigmoid(x @ gate.t()) * ((F.silu(x @ sw1.t()) * (x @ sw3.t())) @ sw2.t())
    assert rel_err(y, want) <= 1e-6 and rel_err(y_train, want) <= 1e-6
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


class FakeCudaStreams:
    """The CUDA stream API that `runtime.shared.overlapped` calls, mocked on the CPU: a log of what is enqueued
    where, and which stream is current when the shared MLP runs. Tensor.record_stream is logged, too: on a
    real GPU a missing record is a use-after-free nobody sees, and a record on a non-tensor an AttributeError
    (the first backward of every shared-expert training run crashed so)."""

    class Stream:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def wait_event(self, event):
            self.log.append(("wait", self.name, event.name))

        def __repr__(self):
            return self.name

    class Event:
        count = 0

        def __init__(self, log):
            FakeCudaStreams.Event.count += 1
            self.log, self.name = log, f"event{FakeCudaStreams.Event.count}"

        def record(self, stream):
            self.log.append(("record", stream.name, self.name))

    def __init__(self, monkeypatch):
        import contextlib

        self.log = []
        self.main = self.Stream(self.log, "main")
        self.current = self.main
        self.recorded = []  # (tensor, stream) of every Tensor.record_stream call

        @contextlib.contextmanager
        def stream(s):
            prev, self.current = self.current, s
            self.log.append(("enter", s.name))
            yield
            self.log.append(("exit", s.name))
            self.current = prev

        def record_stream(t, s):
            if not isinstance(t, torch.Tensor):
                raise AttributeError(f"{type(t).__name__!r} object has no attribute 'record_stream'")
            self.recorded.append((t, s))

        shared_rt._side_stream.cache_clear()
        monkeypatch.setattr(shared_rt, "_on_cuda", lambda x: True)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.main)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.Stream(self.log, "side"))
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: self.Event(self.log))
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream, raising=False)

    def choreography(self):
        """The log without event names: (what, on which stream) in call order."""
        return [entry[:2] for entry in self.log]


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCudaStreams(monkeypatch)
    yield fake
    shared_rt._side_stream.cache_clear()  # the fake side stream must not outlive the test


def test_overlap_on_mocked_cuda_streams_forward_and_backward(fake_cuda, monkeypatch):
    """The CUDA branch of `overlapped`, run on the CPU against a mocked stream API, through the training pair's
    forward AND backward: the shared MLP (its forward, then its backward) runs with the side stream current,
    after the side stream waited for the main one; the main stream waits for the side before the join; every
    tensor the shared MLP returns is record_stream'ed on the main stream — its output in forward, each of its
    gradients in backward (a tuple there: the record on it raised AttributeError). Results equal the
    sequential run's."""
    from moefuse.runtime import autograd as autograd_rt

    spec, x, ids, w, (w1, w2), shared = shared_problem()

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2, *shared)]
        y, _ = torch.ops.moefuse.moe_fwd(leaves[0], ids, *leaves[1:4], None, None, spec.to_key(), *leaves[4:])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        return [y.detach()] + [t.grad for t in leaves]

    on_stream = []
    for mod, name in ((moe_op, "shared_forward"), (autograd_rt, "shared_backward")):
        real = getattr(mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            on_stream.append((_name, fake_cuda.current.name))
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    got = run()
    assert on_stream == [("shared_forward", "side"), ("shared_backward", "side")]
    one_call = [("record", "main"), ("wait", "side"), ("enter", "side"), ("record", "side"), ("exit", "side"),
                ("wait", "main")]
    assert fake_cuda.choreography() == one_call * 2
    # the side waits for the event the main recorded, the main for the one the side recorded
    log = fake_cuda.log
    for i in (0, 6):
        assert log[i][2] == log[i + 1][2] and log[i + 3][2] == log[i + 5][2]
    assert all(s is fake_cuda.main for _, s in fake_cuda.recorded)
    # forward: the shared output; backward: dx, dw1, dw3, dw2, dgate (gated, with w3)
    assert [tuple(t.shape) for t, _ in fake_cuda.recorded] == [
        tuple(x.shape), tuple(x.shape), tuple(shared[0].shape), tuple(shared[3].shape), tuple(shared[1].shape),
        tuple(shared[2].shape)]
    monkeypatch.setattr(shared_rt, "_on_cuda", lambda x: False)
    want = run()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_backward_keeps_nothing_of_the_shared_mlp():
    """Saved for backward: the op's inputs (alive anyway) and the routed experts' h — no shared-expert
    activation; moe_bwd recomputes the shared MLP from x."""
    spec, x, ids, w, (w1, w2), shared = shared_problem()
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2, *shared)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, h = torch.ops.moefuse.moe_fwd(leaves[0], ids, *leaves[1:4], None, None, spec.to_key(), *leaves[4:])
    inputs = {t.data_ptr() for t in (*leaves, ids)}
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in inputs] == [tuple(h.shape)]
    assert h.shape == (ids.numel(), spec.up_rows)  # the routed experts' pre-activation only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the side stream exists only there")
def test_side_stream_overlap_on_cuda(monkeypatch):
    """On CUDA the shared MLP runs on the side stream (its kernels are enqueued there, joined by events) and the
    result, forward and backward (the training pair's gradients against the CPU plan's), equals the
    sequential composition."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec, x, ids, w, (w1, w2), shared = shared_problem("cuda", T=512, H=256, I=128, E=8, Is=512)
    streams = []
    real = shared_rt.shared_forward

    def on_which_stream(*args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_rt, "shared_forward", on_which_stream)
    monkeypatch.setattr(moe_op, "shared_forward", on_which_stream)
    y = torch.ops.moefuse.moe(x, ids, w, w1, w2, None, None, spec.to_key(), *shared)
    assert streams and streams[0] != torch.cuda.current_stream()
    routed = torch.ops.moefuse.moe(x, ids, w, w1, w2, None, None, spec.routed().to_key())
    sw1, sw2, gate, sw3 = shared
    want = routed + real(spec.shared, x, sw1, sw3, sw2, gate)
    torch.cuda.synchronize()
    assert rel_err(y, want) <= 1e-5
    # backward: the training pair on the side stream against the CPU run of the same problem
    def grads(device):
        leaves = [t.detach().to(device).requires_grad_() for t in (x, w, w1, w2, *shared)]
        y, _ = torch.ops.moefuse.moe_fwd(leaves[0], ids.to(device), *leaves[1:4], None, None, spec.to_key(),
                                         *leaves[4:])
        y.backward(torch.ones_like(y))
        return [t.grad.cpu() for t in leaves]

    for a, b in zip(grads("cuda"), grads("cpu")):
        assert rel_err(a, b) <= 1e-4  # fp32 with TF32 off by default for matmuls: both exact to fp32 rounding
