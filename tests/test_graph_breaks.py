"""Graph breaks are the backend's problem: a MoE whose only obstacle is a data-dependent op (bincount) is captured
in one graph with `backend="moefuse"` alone, and a MoE that a graph break still splits is reported with the op,
the source line and a hint that is true."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import moefuse
from moefuse import Backend
from moefuse.compiler.report import AfterGraphBreak, BreakKind, SplitByGraphBreak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_zoo import GroupedMMModel, GroupedMMMoE, PrintingMoE, SplitByCountsMoE  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_path")
ROOT = Path(__file__).resolve().parents[1]


def _line_of(cls, text: str) -> int:
    """The line number in moe_zoo.py of the first line of `cls.forward` containing `text`."""
    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_bincount_moe_is_one_graph_with_the_one_line_compile(inner):
    """A fresh process (dynamo's settings at their defaults, nothing imported but torch and the test MoE):
    `torch.compile(model, backend="moefuse")` and nothing else gives ONE graph for two argsort + bincount
    `F.grouped_mm` blocks, with eager's outputs. MOEFUSE_INNER=eager only skips Inductor's C++ build (the capture
    is dynamo's, before any inner compiler runs); the slow variant runs Inductor, whose bf16 fusions round
    differently from eager's op-by-op bf16 (a few bf16 ulps of outputs of size ~1)."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from moe_zoo import GroupedMMModel
        assert not torch._dynamo.config.capture_dynamic_output_shape_ops  # dynamo's default: a break at bincount
        torch.manual_seed(0)
        model = GroupedMMModel().to(torch.bfloat16)
        x = torch.randn(7, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = model(x)
            out = torch.compile(model, backend="moefuse")(x)
        import moefuse
        from torch._dynamo.utils import counters
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print("graphs", len(moefuse.reports().reports), counters["stats"]["unique_graphs"],
              sum(counters["graph_break"].values()), len(moefuse.reports().lowered), err)
    """)
    env = {**os.environ, "MOEFUSE_INNER": inner, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("MOEFUSE_CAPTURE_DATA_DEPENDENT", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    *counts, err = run.stdout.split()[-5:]
    # one graph, no break, both blocks lowered (detection reads argsort + bincount + x[order // K] by meaning)
    assert counts == ["1", "1", "0", "2"], run.stdout + run.stderr[-2000:]
    # the fused op accumulates in fp32 where eager rounds each bf16 op: a few bf16 ulps of outputs of size ~1
    assert float(err) <= 2 ** -6, run.stdout


@pytest.mark.parametrize("fullgraph", [False, True])
def test_bincount_moe_one_graph_in_process(fullgraph):
    torch.manual_seed(0)
    model = GroupedMMModel().to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend, fullgraph=fullgraph)(x)
    assert len(backend.explanation.reports) == 1, str(backend.explanation)
    assert not any(isinstance(r, SplitByGraphBreak) for r in backend.explanation.rejected)
    assert len(backend.explanation.lowered) == 2, str(backend.explanation)  # both blocks, by meaning
    # fp32 accumulation inside the op vs eager's per-op bf16 rounding: a few bf16 ulps of outputs of size ~1
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 2 ** -6


@pytest.mark.parametrize("counts_by", ["histc", "bincount[:E]"])
def test_tolist_of_counts_is_one_graph(counts_by):
    """A loop over `rows.split(counts.tolist())`: one graph (unbacked ints for the split sizes), eager's outputs."""
    torch.manual_seed(0)
    model = SplitByCountsMoE(counts_by=counts_by)
    x = torch.randn(6, 32)
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend)(x)
    assert len(backend.explanation.reports) == 1, str(backend.explanation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_tolist_of_a_data_dependent_length_does_not_trace():
    """The cost of capturing data-dependent ops, documented in the README: `.tolist()` of a tensor whose length is
    data-dependent (bincount's is max(minlength, max(ids) + 1)) fails to trace instead of breaking the graph.
    If this starts to pass, torch has lifted the limitation: update the README."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    model = SplitByCountsMoE(counts_by="bincount")
    with pytest.raises(GuardOnDataDependentSymNode), torch.no_grad():
        torch.compile(model, backend=Backend({"inner": "eager"}))(torch.randn(6, 32))


def test_without_capture_the_split_names_bincount_and_its_line(monkeypatch):
    """With dynamo's capture turned off (MOEFUSE_CAPTURE_DATA_DEPENDENT=0 and the setting off, as a program may
    do), the block breaks at bincount: the report says so, at the right line, with a hint that names the
    setting."""
    monkeypatch.setenv("MOEFUSE_CAPTURE_DATA_DEPENDENT", "0")
    torch.manual_seed(0)
    model = GroupedMMMoE().to(torch.bfloat16)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        with torch.no_grad():
            explanation = moefuse.explain(model, x)
    splits = [r for r in explanation.rejected if isinstance(r, SplitByGraphBreak)]
    assert len(splits) == 1, str(explanation)
    brk = splits[0].graph_break
    assert brk.kind is BreakKind.DATA_DEPENDENT_SHAPE and "bincount" in brk.op
    assert brk.source == f"moe_zoo.py:{_line_of(GroupedMMMoE, 'torch.bincount')}"
    assert splits[0].reason.name == "EXPERTS_OUTSIDE_GRAPH"
    text = str(explanation)
    assert "spans two graphs" in text and "capture_dynamic_output_shape_ops" in text and "MOEFUSE_CAPTURE" in text


def test_print_inside_the_moe_is_reported_with_a_true_hint(capsys):
    torch.manual_seed(0)
    model = PrintingMoE().to(torch.bfloat16)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        explanation = moefuse.explain(model, x)
        backend = Backend({"inner": "eager"})
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    splits = [r for r in explanation.rejected if isinstance(r, SplitByGraphBreak)]
    assert len(splits) == 1, str(explanation)
    brk = splits[0].graph_break
    assert brk.kind is BreakKind.UNSUPPORTED_CALL and brk.op == "print"
    assert brk.source == f"moe_zoo.py:{_line_of(PrintingMoE, 'print(')}" and brk.code.startswith("print(")
    assert "torch.compiler.is_compiling()" in str(explanation)
    # The graph that resumes after the break holds the block's second half: reported with the same break, not
    # with detection's "file an issue" hints.
    assert all(r.graph_break == brk for r in explanation.rejected if isinstance(r, AfterGraphBreak))
    assert "file an issue" not in str(explanation), str(explanation)

    # The hint is true: skipping the print while compiling makes the block one graph.
    class Fixed(PrintingMoE):
        pass

    src = textwrap.dedent(inspect.getsource(PrintingMoE.forward)).replace(
        'print("tokens per expert", counts)',
        'if not torch.compiler.is_compiling():\n        print("tokens per expert", counts)')
    namespace = {}
    exec(compile(src, "fixed", "exec"), sys.modules[PrintingMoE.__module__].__dict__, namespace)
    Fixed.forward = namespace["forward"]
    fixed = Fixed().to(torch.bfloat16)
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():
        explanation = moefuse.explain(fixed, x)
    assert len(explanation.reports) == 1 and not any(isinstance(r, SplitByGraphBreak) for r in explanation.rejected)


class BreakAfterMoE(nn.Module):
    """A graph break after the MoE block has finished (a print of the hidden states): not moefuse's to report."""

    def __init__(self):
        super().__init__()
        self.moe = GroupedMMMoE()
        self.out = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        h = x + self.moe(x)
        print("hidden", h.shape, h.float().norm())
        return self.out(h)


class SamplingBreak(nn.Module):
    """Top-k sampling over a vocabulary, then a host-side pick: a top-k that is live at a break, but not routing."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 5000, bias=False)

    def forward(self, x):
        values, ids = self.head(x).softmax(-1).topk(50, dim=-1)
        print("candidates", ids.shape)
        return values.sum(-1)


@pytest.mark.parametrize("cls", [BreakAfterMoE, SamplingBreak])
def test_break_outside_the_moe_is_not_reported(cls):
    torch.manual_seed(0)
    model = cls().to(torch.bfloat16)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        explanation = moefuse.explain(model, x)
    assert len(explanation.reports) == 2, str(explanation)  # the break happened
    assert not any(isinstance(r, SplitByGraphBreak) for r in explanation.rejected), str(explanation)


def test_capture_can_be_left_off(monkeypatch):
    from moefuse.compiler.capture import enable_data_dependent_capture

    monkeypatch.setenv("MOEFUSE_CAPTURE_DATA_DEPENDENT", "0")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        assert enable_data_dependent_capture() is False
        assert not torch._dynamo.config.capture_dynamic_output_shape_ops


@pytest.mark.parametrize("router,candidate,same", [
    ("<top>", "experts", True),  # the frame is the block itself
    ("layers.0", "layers.0", True),
    ("layers.0", "layers.0.experts", True),
    ("layers.0.mlp.gate", "layers.0.mlp.experts", True),  # top-k in a router submodule: its parent is the block
    ("gate", "experts", True),
    ("layers.0", "layers.1", False),  # the next layer in the resumed code keeps its own rejection
    ("layers.0.mlp.gate", "layers.1.mlp.experts", False),
    ("layers.0", "<top>", False),
])
def test_after_split_marks_only_the_split_block(router, candidate, same):
    from moefuse.compiler.capture import _same_block

    assert _same_block(router, candidate) is same


def test_a_pass_that_cannot_read_a_graph_leaves_it_unchanged(monkeypatch):
    """Graphs with unbacked sizes are new ground for the passes: one that raises reports the graph as not taken
    and the graph runs as dynamo captured it, instead of failing the user's compile."""
    from moefuse.compiler import backend as backend_module

    def broken(gm):
        raise RuntimeError("cannot read this graph\nsecond line")

    monkeypatch.setattr(backend_module, "detect", broken)
    torch.manual_seed(0)
    model = GroupedMMMoE().to(torch.bfloat16)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    [rejection] = backend.explanation.rejected
    assert rejection.reason.name == "UNSUPPORTED_FORM"
    assert rejection.detail == "detection raised RuntimeError: cannot read this graph"


@pytest.mark.parametrize("capture,kind", [(False, BreakKind.DATA_DEPENDENT_SHAPE), (True, BreakKind.OTHER)])
def test_data_dependent_hint_only_when_capture_was_off(capture, kind):
    """"Turn capture on" is the hint only when it was off as dynamo traced (the backend runs inside the trace)."""
    import traceback
    from types import SimpleNamespace

    from moefuse.compiler.capture import graph_break_of

    frame = traceback.FrameSummary("/src/moe.py", 12, "forward", line="counts = torch.bincount(ids)")
    reason = SimpleNamespace(graph_break=True, user_stack=[frame], reason=(
        "Dynamic shape operator\n  Explanation: ...\n\n  Developer debug context: aten.bincount.default\n"))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        brk = graph_break_of(SimpleNamespace(compile_subgraph_reason=reason))
    assert (brk.kind, brk.source, brk.code) == (kind, "moe.py:12", "counts = torch.bincount(ids)")
    assert brk.op == "aten.bincount.default"


def test_torch_compile_does_not_forward_backend_ctx_ctor():
    """Why capture is process-wide (compiler/capture.py): dynamo enters a backend's `backend_ctx_ctor` around the
    frames it traces only when the backend reaches it unwrapped; torch.compile's wrapper drops it. If this fails,
    torch forwards it now, and the capture settings can be scoped to moefuse's frames."""
    import contextlib

    entered = []

    class Probe:
        def __init__(self):
            self.backend_ctx_ctor = lambda: contextlib.nullcontext(entered.append(1))

        def __call__(self, gm, example_inputs, **kwargs):
            return gm.forward

    torch.compile(lambda t: t.sin(), backend=Probe())(torch.randn(3))
    assert entered == []
    torch._dynamo.optimize(Probe())(lambda t: t.cos())(torch.randn(3))
    assert entered  # the hook itself works
