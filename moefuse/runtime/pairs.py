"""Flat (token, expert) pairs: the routing of token rounding, which gives tokens a variable number of experts.

Buffers are sized by the upper bound S_max = T·K + E·(M−1) (M = tile_m); the true count lives only on the
device (token_offsets[T]), so nothing here needs a host sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class FlatPairs(NamedTuple):
    """Token-major (token, expert, weight) pairs.

    token:         [S_max] int32, the token of each pair, non-decreasing over the used prefix;
    expert:        [S_max] int32, the expert of each pair; −1 marks an unused slot (unused slots form the tail);
    weight:        [S_max] float (the routing weights' dtype), the combine weight, 0 in unused slots;
                   differentiable: gradients flow through it to the router;
    token_offsets: [T+1] int32, pairs of token t are [token_offsets[t], token_offsets[t+1]).
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    token_offsets: torch.Tensor
