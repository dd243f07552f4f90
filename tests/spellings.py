"""One MoE layer, many spellings: a module whose forward is assembled from independent choices of how real
code writes each step (the sort, the counts, the offsets, the expert products, gate/up, the un-permute, the
combine). Every spelling computes the same function of (x, router, weights), so the tests can ask of each:
lowered by moefuse, with eager's numbers?

Used by tests/test_spellings.py and tests/test_fuzz.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SORTS = ("argsort", "argsort_stable", "sort")
COUNTS = ("bincount", "histc", "one_hot_sum", "scatter_add", "routing_map")
UNPERMUTES = ("setitem", "scatter", "index_copy", "inverse_gather")
COMBINES = ("view_sum", "index_add", "scatter_add", "index_put_accumulate", "einsum")
GATE_UP = ("fused_chunk", "fused_slice", "separate")
PRODUCTS = {  # how the expert products are written, per form
    "grouped": ("grouped_mm",),
    "gathered": ("einsum", "bmm", "matmul"),
    "dense": ("einsum_tei", "einsum_eti", "matmul"),
}


@dataclass(frozen=True)
class Spelling:
    form: str = "grouped"  # grouped | gathered | dense
    product: str = "grouped_mm"
    sort: str = "argsort"
    count: str = "bincount"
    unpermute: str = "setitem"
    combine: str = "view_sum"
    gate_up: str = "fused_chunk"
    in_out: bool = True  # weights stored [E, in, out] (else [E, out, in])
    weights_first: bool = False  # routing weights multiplied into the expert rows before the un-permute

    def __str__(self) -> str:
        return "-".join(f"{v}" for v in vars(self).values())


class SpelledMoE(nn.Module):
    def __init__(self, spelling: Spelling, dim=32, inter=16, experts=6, top_k=2):
        super().__init__()
        self.s, self.E, self.K, self.I = spelling, experts, top_k, inter
        self.router = nn.Linear(dim, experts, bias=False)

        def w(n_in, n_out):
            t = torch.randn(experts, n_in, n_out) * n_in ** -0.5
            return nn.Parameter(t if spelling.in_out else t.transpose(1, 2).contiguous())

        if spelling.gate_up == "separate":
            self.w_gate, self.w_up = w(dim, inter), w(dim, inter)
        else:
            self.w_gate_up = w(dim, 2 * inter)
        self.w_down = w(inter, dim)

    # ---- expert products: rows [S, in] of experts given per row (gathered), per group (grouped) ----
    def _w(self, name):
        p = getattr(self, name)
        return p if self.s.in_out else p.transpose(1, 2)  # [E, in, out] as the products read it

    def _grouped(self, rows, name, offs):
        return torch._grouped_mm(rows, self._w(name), offs=offs)

    def _gathered(self, rows, name, flat_ids):
        w = self._w(name)[flat_ids]  # [S, in, out]
        if self.s.product == "einsum":
            return torch.einsum("si,sio->so", rows, w)
        if self.s.product == "bmm":
            return torch.bmm(rows.unsqueeze(1), w).squeeze(1)
        return torch.matmul(rows.unsqueeze(1), w).squeeze(1)

    def _act(self, project):
        if self.s.gate_up == "separate":
            return F.silu(project("w_gate")) * project("w_up")
        h = project("w_gate_up")
        if self.s.gate_up == "fused_chunk":
            gate, up = h.chunk(2, dim=-1)
        else:
            gate, up = h[..., : self.I], h[..., self.I:]
        return F.silu(gate) * up

    # ---- routing metadata ----
    def _order(self, flat):
        if self.s.sort == "argsort":
            return torch.argsort(flat)
        if self.s.sort == "argsort_stable":
            return torch.argsort(flat, stable=True)
        return torch.sort(flat, stable=True).indices

    def _counts(self, flat, ids):
        E = self.E
        if self.s.count == "bincount":
            return torch.bincount(flat, minlength=E)
        if self.s.count == "histc":
            return torch.histc(flat.float(), bins=E, min=0, max=E - 1).long()
        if self.s.count == "one_hot_sum":
            return F.one_hot(flat, E).sum(0)
        if self.s.count == "scatter_add":
            return torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add(0, flat, torch.ones_like(flat))
        return torch.zeros(ids.shape[0], E, dtype=torch.bool, device=flat.device).scatter_(1, ids, True).sum(0)

    def _unpermute(self, ys, order):
        if self.s.unpermute == "setitem":
            out = torch.empty_like(ys)
            out[order] = ys
            return out
        if self.s.unpermute == "scatter":
            return torch.zeros_like(ys).scatter(0, order.unsqueeze(1).expand_as(ys), ys)
        if self.s.unpermute == "index_copy":
            return torch.zeros_like(ys).index_copy(0, order, ys)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return ys[inverse]

    # ---- forward ----
    def forward(self, x):
        T, H = x.shape
        K = self.K
        probs = self.router(x).softmax(-1)
        topw, ids = probs.topk(K, dim=-1)
        topw = topw / topw.sum(-1, keepdim=True)
        if self.s.form == "dense":
            return self._dense(x, topw, ids)
        flat = ids.reshape(-1)
        if self.s.form == "grouped":
            order = self._order(flat)
            offs = self._counts(flat, ids).cumsum(0).to(torch.int32)
            rows = x[order // K]
            ys = self._grouped(self._act(lambda n: self._grouped(rows, n, offs)), "w_down", offs)
            if self.s.weights_first:
                ys = ys * topw.reshape(-1)[order].unsqueeze(-1)
            pair_y = self._unpermute(ys, order)  # [T·K, H] in (token, slot) order
        else:
            rows = x.repeat_interleave(K, dim=0)
            pair_y = self._gathered(self._act(lambda n: self._gathered(rows, n, flat)), "w_down", flat)
            if self.s.weights_first:
                pair_y = pair_y * topw.reshape(-1, 1)
        return self._combine(pair_y, topw, T, H)

    def _combine(self, pair_y, topw, T, H):
        K, c = self.K, self.s.combine
        w = torch.ones_like(topw) if self.s.weights_first else topw
        if c == "view_sum":
            return (pair_y.view(T, K, H) * w.unsqueeze(-1)).sum(1)
        if c == "einsum":
            return torch.einsum("tkh,tk->th", pair_y.view(T, K, H), w)
        token = torch.arange(T, device=pair_y.device).repeat_interleave(K)
        weighted = pair_y * w.reshape(-1, 1)
        out = torch.zeros(T, H, dtype=pair_y.dtype, device=pair_y.device)
        if c == "index_add":
            return out.index_add_(0, token, weighted)
        if c == "scatter_add":
            return out.scatter_add_(0, token.unsqueeze(1).expand(-1, H), weighted)
        return out.index_put_((token,), weighted, accumulate=True)

    def _dense(self, x, topw, ids):
        """Every expert on every token; the routing weights scattered into a dense [T, E] gate matrix."""
        gates = torch.zeros(x.shape[0], self.E, dtype=x.dtype, device=x.device).scatter(1, ids, topw)
        p = self.s.product
        if p == "einsum_tei":
            h = self._act(lambda n: torch.einsum("th,eho->teo", x, self._w(n)))
            y = torch.einsum("tei,eih->teh", h, self._w("w_down"))
            return torch.einsum("teh,te->th", y, gates)
        if p == "einsum_eti":
            h = self._act(lambda n: torch.einsum("eho,th->eto", self._w(n), x))
            y = torch.einsum("eti,eih->eth", h, self._w("w_down"))
            return (y * gates.t().unsqueeze(-1)).sum(0)
        h = self._act(lambda n: torch.matmul(x, self._w(n)))  # [E, T, out]
        y = torch.matmul(h, self._w("w_down"))
        return torch.einsum("eth,te->th", y, gates)
