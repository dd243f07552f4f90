"""benchmarks/gpu_check.sh rehearsed on the CPU (MOEFUSE_GPU_REHEARSAL=1): the device script runs as a GPU
session would run it — the lane's tests that are not CUDA-only on the Triton interpreter, the benchmark at
tiny shapes — and leaves its whole folder: the lane's junit and log, the benchmark's JSON and markdown, a
summary. So the script and the lane cannot rot between GPU runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_rehearsal(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEFUSE_GPU_LANE")}
    env.update(MOEFUSE_GPU_REHEARSAL="1", PYTHON=sys.executable, MOEFUSE_CACHE_DIR=str(tmp_path / "cache"),
               MOEFUSE_LANE_LIMIT="400", MOEFUSE_BENCH_LIMIT="200")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=700)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"

    # the lane ran: its rehearsable tests passed, the CUDA-only ones skipped, nothing failed
    suite = ET.parse(out / "lane.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, logs
    assert tests - skipped >= 8 and skipped >= 2, (tests, skipped)
    names = {case.get("name") for case in suite.iter("testcase")}
    assert any(n.startswith("test_shared_expert_training_step_on_the_side_stream") for n in names)
    assert any(n.startswith("test_cuda_graph") for n in names)  # collected, skipped on the CPU

    # the benchmark wrote its rows and its markdown table; the summary says both passed
    bench = json.loads((out / "bench.json").read_text())
    assert bench["environment"]["interpreter"] is True and any("fwd_ms" in r for r in bench["rows"])
    table = (out / "bench.md").read_text()
    assert "| shape | path |" in table and "| tiny | moefuse |" in table
    summary = (out / "summary.md").read_text()
    assert "lane (`pytest -m gpu`): passed" in summary and "benchmark (" in summary and ": passed in" in summary
    assert "none (rehearsal on the CPU)" in (out / "environment.txt").read_text()
