"""The error measure every parity check uses (tests, the convert probe, benchmarks)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32: the error measure of every parity check against eager."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
