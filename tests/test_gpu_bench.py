"""benchmarks/gpu.py --tiny on the CPU, so the GPU benchmark cannot rot between GPU runs: the same code path
(moefuse's Triton kernels under the interpreter, the reference check, the table, the JSON), with CUDA events
and memory counters replaced by their CPU stand-ins. Inner compiler "eager": Inductor's C++ build of the
baseline would take minutes on a small CPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from moefuse.runtime import op

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_tiny_runs_on_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "0")  # main() sets it from --autotune; restored after the test
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `from _env import …`, as when run as a script
    spec = importlib.util.spec_from_file_location("moefuse_gpu_bench", BENCHMARKS / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)

    before = dict(op.counters)
    try:
        rows = bench.main(["--tiny", "--compiler", "eager", "--json", str(tmp_path / "out.json")])
    finally:
        torch._dynamo.reset()
    # The moefuse rows ran the fused op's Triton path, forward and backward
    assert op.counters["triton"] > before["triton"]
    assert op.counters["fwd_train_triton"] > before["fwd_train_triton"]
    assert op.counters["bwd_triton"] > before["bwd_triton"]

    measured = [r for r in rows if "fwd_ms" in r]
    assert {r["shape"] for r in measured} == {s.name for s in bench.TINY_SHAPES}
    fused = [r for r in measured if r["path"] == bench.MOEFUSE]
    assert len(fused) == len(bench.TINY_SHAPES)
    for row in fused:
        assert row["err_y"] <= bench.TOLERANCE[torch.float32]
        assert row["fwd_peak_mib"] is None  # no CUDA memory counters on the CPU
    assert all(r["err_dx"] <= bench.TOLERANCE[torch.float32] for r in fused if "err_dx" in r)
    assert any("train_ms" in r for r in fused)
    assert {r["path"] for r in rows if "error" in r} == {bench.LIGER, bench.SONIC}  # CUDA only

    out = capsys.readouterr().out
    assert "fwd+bwd TFLOPS" in out and "transformers grouped_mm+eager" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["environment"]["interpreter"] is True and len(saved["rows"]) == len(rows)
