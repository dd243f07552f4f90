"""The backend survives the ways people call torch.compile: wrappers that deep-copy or pickle its arguments
(Lightning Fabric), functools.partial, compiling a module twice, per-block compile (torchtitan), fullgraph=True,
and mode= / Inductor options passed through to Inductor."""
from __future__ import annotations

import copy
import functools
import logging
import pickle
import sys
from pathlib import Path

import pytest
import torch

import moefuse
from moefuse import Backend
from moefuse.compiler.backend import moefuse_backend, split_options
from moefuse.errors import OptionsError
from moefuse.runtime import op as moe_op

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from simple_moe import SimpleMoEModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_path")


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    model = SimpleMoEModel(hidden=32, intermediate=16, num_experts=4, top_k=2)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def _fused_calls():
    return moe_op.counters["cpu"]


def test_backend_copies_and_pickles(model_and_input):
    model, x, ref = model_and_input
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert len(backend.explanation.lowered) == 2
    # A copy is the backend itself: what a copy compiles is reported where the caller reads.
    assert copy.deepcopy(backend) is backend and copy.copy(backend) is backend
    assert copy.deepcopy({"backend": backend})["backend"] is backend
    # Pickling gives an independent backend with the same options and the reports so far.
    clone = pickle.loads(pickle.dumps(backend))
    assert clone is not backend and clone.options == backend.options
    assert [str(r) for r in clone.explanation.reports] == [str(r) for r in backend.explanation.reports]
    # The registered backend unpickles as the registered one (torch looks "moefuse" up to that object).
    assert pickle.loads(pickle.dumps(moefuse_backend)) is moefuse_backend
    assert copy.deepcopy(moefuse_backend) is moefuse_backend
    partial = functools.partial(moefuse_backend, options={"inner": "eager"})
    assert pickle.loads(pickle.dumps(partial)).keywords == {"options": {"inner": "eager"}}


def _lightning_like_compile(monkeypatch):
    """torch.compile wrapped the way lightning.fabric wraps it: it compiles, then keeps a deep copy of the
    keyword arguments on the compiled module (Fabric.setup compiles again with them). Pickles them too, as
    process launchers do."""
    real = torch.compile

    def compile(*args, **kwargs):
        if not args or not isinstance(args[0], torch.nn.Module):
            return real(*args, **kwargs)
        compiled = real(args[0], **kwargs)
        compiled._compile_kwargs = copy.deepcopy(kwargs)
        pickle.dumps(kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", compile)


def test_explain_and_backend_under_a_deep_copying_compile(monkeypatch, model_and_input):
    model, x, ref = model_and_input
    _lightning_like_compile(monkeypatch)
    with torch.no_grad():
        explanation = moefuse.explain(model, x)
    assert len(explanation.lowered) == 2, str(explanation)

    before, calls = len(moefuse.reports().reports), _fused_calls()
    with torch.no_grad():
        compiled = torch.compile(model, backend="moefuse", options={"inner": "eager"})
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    assert len(moefuse.reports().reports) == before + 1 and _fused_calls() - calls == 2

    # Compiling again with the stored copy (Fabric.setup): the reports land in the caller's backend.
    backend = Backend({"inner": "eager"})
    first = torch.compile(model, backend=backend)
    torch._dynamo.reset()
    again = torch.compile(model, **first._compile_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-5)
    assert len(backend.explanation.lowered) == 2


def test_explain_after_importing_lightning_fabric(model_and_input):
    pytest.importorskip("lightning.fabric")
    assert hasattr(torch.compile, "__wrapped__")  # lightning wrapped it
    model, x, ref = model_and_input
    with torch.no_grad():
        explanation = moefuse.explain(model, x)
        out = torch.compile(model, backend="moefuse", options={"inner": "eager"})(x)
    assert len(explanation.lowered) == 2, str(explanation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_partial_sets_the_options(model_and_input):
    model, x, ref = model_and_input
    before, calls = len(moefuse.reports().reports), _fused_calls()
    backend = functools.partial(moefuse_backend, options={"inner": "eager", "lower": False})
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    new = moefuse.reports().reports[before:]
    assert len(new) == 1 and new[0].inner == "eager" and len(new[0].lowered) == 2
    assert all("not rewritten" in r.node for r in new[0].lowered) and _fused_calls() == calls
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_compiling_twice(model_and_input):
    model, x, ref = model_and_input
    backend = Backend({"inner": "eager"})
    calls = _fused_calls()
    with torch.no_grad():
        a = torch.compile(model, backend=backend)
        b = torch.compile(model, backend=backend)
        nested = torch.compile(torch.compile(model, backend=backend), backend=backend)
        for compiled in (a, b, nested):
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
        model.compile(backend=backend)
        model.compile(backend=backend)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert backend.explanation.reports and all(len(r.lowered) == 2 for r in backend.explanation.reports)
    assert _fused_calls() - calls == 8  # four compiled callables, two layers each


def test_per_block_compile_like_torchtitan(model_and_input):
    model, x, ref = model_and_input
    backend = Backend({"inner": "eager"})
    for block in model.moes:
        block.compile(backend=backend)
    calls = _fused_calls()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert _fused_calls() - calls == 2
    assert [len(r.lowered) for r in backend.explanation.reports] == [1] * len(backend.explanation.reports)
    assert len(backend.explanation.lowered) >= 1


def test_fullgraph(model_and_input):
    model, x, ref = model_and_input
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert len(backend.explanation.reports) == 1 and len(backend.explanation.lowered) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _InductorRecorder:
    """Stands in for torch's Inductor entry: records what moefuse hands it, runs the graph eagerly."""

    seen: list = []

    def __init__(self, mode, options, dynamic):
        self.seen.append((mode, options))

    def __call__(self, gm, example_inputs):
        return gm.forward


@pytest.mark.parametrize("kwargs,expected", [
    (dict(mode="max-autotune"), ("max-autotune", None)),
    (dict(mode="reduce-overhead"), ("reduce-overhead", None)),
    (dict(options={"epilogue_fusion": False, "verify": True, "triton.cudagraphs": False}),
     (None, {"epilogue_fusion": False, "triton.cudagraphs": False})),
])
def test_mode_and_inductor_options_reach_inductor(monkeypatch, model_and_input, kwargs, expected):
    model, x, ref = model_and_input
    monkeypatch.delenv("MOEFUSE_INNER", raising=False)
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", _InductorRecorder)
    _InductorRecorder.seen = []
    before = len(moefuse.reports().reports)
    with torch.no_grad():
        out = torch.compile(model, backend="moefuse", **kwargs)(x)
    assert _InductorRecorder.seen == [expected]
    report = moefuse.reports().reports[before]
    assert report.inner == "inductor" and len(report.lowered) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_options_reach_compile_fx(monkeypatch, model_and_input):
    """The real hand-off (C++ on the CPU): Inductor's keys arrive in compile_fx's config patches, moefuse's do not."""
    from torch._inductor import compile_fx as fx_module

    model, x, ref = model_and_input
    monkeypatch.delenv("MOEFUSE_INNER", raising=False)
    patches, real = [], fx_module.compile_fx
    monkeypatch.setattr(fx_module, "compile_fx", lambda gm, ex, **kw: patches.append(kw.get("config_patches"))
                        or real(gm, ex, **kw))
    calls = _fused_calls()
    with torch.no_grad():
        out = torch.compile(model, backend="moefuse", options={"epilogue_fusion": False, "verify": True})(x)
    assert patches and patches[0]["epilogue_fusion"] is False and "verify" not in patches[0]
    assert _fused_calls() - calls == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_real_inductor_takes_options_it_knows():
    """torch's own Inductor wrapper validates the keys moefuse passes on (no compile: construction only)."""
    opts, inductor = split_options({"inner": "inductor", "max_autotune": True, "triton.cudagraphs": False})
    wrapper = torch._TorchCompileInductorWrapper("max-autotune", inductor, None)
    assert wrapper.config["max_autotune"] is True and wrapper.config["triton.cudagraphs"] is False
    assert opts.inner == "inductor"


def test_options_neither_moefuse_nor_inductor_are_an_error():
    with pytest.raises(OptionsError, match=r"unknown moefuse option\(s\) \['innr'\]; valid options are \['inner'.*"
                                           r"or any Inductor option"):
        Backend({"innr": "eager"})
    opts, inductor = split_options({"token_rounding": "up", "epilogue_fusion": False})
    assert opts.token_rounding == "up" and inductor == {"epilogue_fusion": False}


def test_inductor_settings_with_inner_eager_warn(caplog, model_and_input):
    model, x, ref = model_and_input
    with caplog.at_level(logging.WARNING, logger="moefuse"), torch.no_grad():
        torch.compile(model, backend=Backend({"inner": "eager", "max_autotune": True}))(x)
    assert "do nothing" in caplog.text and "max_autotune" in caplog.text
