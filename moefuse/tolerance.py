"""How close a reduced-precision result must be: derived from the dtype's rounding, never picked.

moefuse's result and eager's, both computed in the dtype from the same inputs, are measured against one reference in a
wider dtype; moefuse's error must be within EAGER_FACTOR × eager's plus OUTPUT_ROUNDINGS units of the dtype's
roundoff at the reference's scale (`parity_bound`). Eager's error carries the reduction lengths and the data's
conditioning, so the bound follows the layer and the machine rather than one CPU's numbers. Verification
(`moefuse.compiler.verify`) applies it to the captured region vs the fused op; the tests through
`moefuse.testing.assert_parity`.
"""
from __future__ import annotations

import torch

# Unit roundoff u = 2^-p of each dtype (p = significand bits with the implicit one): the largest relative error
# of one round-to-nearest.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# How many times eager's error moefuse's may reach. Both round to the dtype after fp32 accumulations over the
# same reduction lengths, at a comparable number of points: moefuse's forward at A, Y and the output (eager: h,
# each step of the activation, A, each expert's output, the running sum over K); its backward at H, dH, A',
# each pair's dX and every gradient (eager: the recomputed forward's steps and each op's gradient). The same
# number of roundings placed differently gives errors of the same size but not the same value: 3 covers the
# spread between two such sums of u-sized terms (the worst measured in the kernel tests: 1.7× eager's, bf16
# dx of K=E). The error of each is measured against one reference of the same computation in float64 (or
# fp32 for whole models) from the same dtype-valued inputs, so both see the same input rounding, and the
# reduction length enters through eager's error.
EAGER_FACTOR = 3.0
# Plus this many units of the dtype's roundoff at the reference's scale: the rounding of the output itself,
# which even an exact computation pays and which eager can dodge by chance on a tiny tensor.
OUTPUT_ROUNDINGS = 2


def parity_bound(eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest max |moefuse - ref| allowed: EAGER_FACTOR·max |eager - ref| + OUTPUT_ROUNDINGS·u·max |ref|."""
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    err_eager = (eager.double() - ref).abs().max().item()
    return EAGER_FACTOR * err_eager + OUTPUT_ROUNDINGS * UNIT_ROUNDOFF[dtype] * ref.abs().max().item()


