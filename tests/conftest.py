import os

# The kernel tests run Triton under its interpreter, and `triton.jit` reads TRITON_INTERPRET when a kernel is
# *defined*. pytest may import another test module (and through it moefuse's kernels) before
# test_kernels.py, so the variable is set here, before any test module is collected. The compile-only tests
# build real GPU code in a subprocess that removes it again.
os.environ["TRITON_INTERPRET"] = "1"
