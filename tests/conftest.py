import os
import sys

# The kernel tests run Triton under its interpreter, and `triton.jit` reads TRITON_INTERPRET when a kernel is
# *defined* — triton.language's own jit functions (tl.sum, tl.cumsum, …) included, which are defined when
# triton is first imported. So the variable is set, and triton imported, here: before any test module is
# collected and before torch may import triton while a test has the variable removed (the CPU-path tests
# remove it so that moefuse::moe takes its torch path). The compile-only tests build real GPU code in a
# subprocess that removes it again.
#
# The GPU lane (`pytest -m gpu`, run by benchmarks/gpu_check.sh with MOEFUSE_GPU_LANE=1) must define real
# kernels on a GPU: there the environment decides (the script sets TRITON_INTERPRET=1 only when it rehearses
# on a CPU), and only the lane's files are collected — test modules such as test_kernels set the variable
# themselves at import.
if os.environ.get("MOEFUSE_GPU_LANE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401

from moefuse.testing import install_interpreter_bf16_dot  # noqa: E402

# The interpreter multiplies bf16 bit patterns as integers in tl.dot (triton issue 11584): the shim converts
# them to fp32 exactly first, so bf16 runs through the kernels on the CPU (tests/test_bf16_shim.py tests the
# shim itself against torch).
if os.environ.get("TRITON_INTERPRET") == "1":  # not in the GPU lane on a GPU: real kernels, nothing to patch
    install_interpreter_bf16_dot()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def cpu_path(monkeypatch):
    """moefuse::moe on its torch CPU path (TRITON_INTERPRET removed for the test), with dynamo's caches fresh
    before and after, so each test compiles what it runs. A test may set TRITON_INTERPRET=1 again itself."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """The fuzz test's statistics (lowered vs rejected, by reason), after pytest's own summary."""
    fuzz = sys.modules.get("test_fuzz") or sys.modules.get("tests.test_fuzz")
    line = fuzz.summary() if fuzz is not None else None
    if line:
        terminalreporter.write_line(line)
