"""MoE layers as other codebases write them, restated with their own spelling (names, op order, idioms) for
the detection tests. Each class names its source; sizes are the caller's. Random weights, no download.

Nothing here is moefuse code: these are the inputs detection must understand by meaning.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _param(*shape, scale):
    return nn.Parameter(torch.randn(*shape) * scale)


class TitanMoE(nn.Module):
    """torchtitan 0.3 `models/common/moe.py`: `TokenChoiceTopKRouter` (sigmoid or softmax scores, top-k with
    sorted=False, scores gathered by the ids, optional renormalisation, route_scale), token counts from a
    boolean routing map scattered with the ids and summed, `LocalTokenDispatcher` (stable argsort of the flat
    ids, scores and tokens gathered in that order, `// top_k`), `GroupedExperts` (w1/w3/w2 as three
    `torch._grouped_mm` in bf16 whatever the parameters' dtype, offsets from an int32 cumsum), the combine
    (fp32 multiply by the sorted scores, scatter_add into zeros), and a shared `FeedForward` (w1, w2, w3
    linears) added to the routed output."""

    def __init__(self, dim=64, hidden=32, experts=8, top_k=2, score="softmax", route_norm=True, route_scale=1.0,
                 shared=True):
        super().__init__()
        self.top_k, self.score, self.route_norm, self.route_scale = top_k, score, route_norm, route_scale
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1_EFD = _param(experts, hidden, dim, scale=dim ** -0.5)
        self.w2_EDF = _param(experts, dim, hidden, scale=hidden ** -0.5)
        self.w3_EFD = _param(experts, hidden, dim, scale=dim ** -0.5)
        if shared:
            self.shared_w1 = nn.Linear(dim, 2 * hidden, bias=False)
            self.shared_w2 = nn.Linear(2 * hidden, dim, bias=False)
            self.shared_w3 = nn.Linear(dim, 2 * hidden, bias=False)
        self.shared = shared

    def router(self, x_BLD):
        scores_BLE = self.gate(x_BLD)
        scores_BLE = torch.sigmoid(scores_BLE) if self.score == "sigmoid" else F.softmax(scores_BLE, dim=-1)
        _, ids_BLK = torch.topk(scores_BLE, k=self.top_k, dim=-1, sorted=False)
        topk_scores_BLK = scores_BLE.gather(dim=-1, index=ids_BLK)
        if self.route_norm:
            topk_scores_BLK = topk_scores_BLK / (topk_scores_BLK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_scores_BLK * self.route_scale, ids_BLK, scores_BLE

    expert_dtype = torch.bfloat16  # torchtitan's; a test's fp32 reference sets float32

    def _cast(self, t):
        return t.bfloat16() if self.expert_dtype is torch.bfloat16 else t.float()

    def experts(self, x_RD, num_tokens_per_expert_E):
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        h_RF = F.silu(torch._grouped_mm(self._cast(x_RD), self._cast(self.w1_EFD).transpose(-2, -1), offs=offsets_E))
        h_RF = h_RF * torch._grouped_mm(self._cast(x_RD), self._cast(self.w3_EFD).transpose(-2, -1), offs=offsets_E)
        return torch._grouped_mm(h_RF, self._cast(self.w2_EDF).transpose(-2, -1), offs=offsets_E).type_as(x_RD)

    def forward(self, x_BLD):
        scores_BLK, ids_BLK, scores_BLE = self.router(x_BLD)
        routing_map_BLE = torch.zeros_like(scores_BLE, dtype=torch.bool).scatter_(-1, ids_BLK, True)
        num_tokens_per_expert_E = routing_map_BLE.sum(dim=(0, 1))
        B, L, D = x_BLD.shape
        K = scores_BLK.size(-1)
        x_TD = x_BLD.view(B * L, D)
        scores_TK, ids_TK = scores_BLK.view(B * L, K), ids_BLK.view(B * L, K)
        order_N = torch.argsort(ids_TK.view(-1), stable=True)
        scores_sorted_N = scores_TK.view(-1)[order_N]
        tokens_N = order_N // K
        routed_RD = self.experts(x_TD[tokens_N], num_tokens_per_expert_E)
        out_TD = torch.zeros_like(x_TD)
        routed_RD = (routed_RD.to(torch.float32) * scores_sorted_N.reshape(-1, 1)).to(routed_RD.dtype)
        out_TD = out_TD.scatter_add(0, tokens_N.reshape(-1, 1).expand(-1, D), routed_RD)
        out_BLD = out_TD.view(B, -1, D)
        if self.shared:
            out_BLD = out_BLD + self.shared_w2(F.silu(self.shared_w1(x_BLD)) * self.shared_w3(x_BLD))
        return out_BLD


class GptFastMoE(nn.Module):
    """gpt-fast's Mixtral `MOEFeedForward` / `ConditionalFeedForward`: per-token gathered expert weights
    `w1[expert_indices]` contracted by einsum ('ti,taoi->tao'), gate and up as separate w1/w3, the combine an
    einsum with the renormalised top-k weights ('tai,ta->ti')."""

    def __init__(self, dim=64, intermediate=32, experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = _param(experts, intermediate, dim, scale=dim ** -0.5)
        self.w2 = _param(experts, dim, intermediate, scale=intermediate ** -0.5)
        self.w3 = _param(experts, intermediate, dim, scale=dim ** -0.5)

    def forward(self, x):
        x = x.view(-1, x.shape[-1])
        expert_weights = F.softmax(self.gate(x), dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.top_k, dim=-1)
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        w1_weights, w3_weights, w2_weights = self.w1[expert_indices], self.w3[expert_indices], self.w2[expert_indices]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)


class GatheredBmmMoE(nn.Module):
    """The gathered-weights form spelled with bmm and a fused [gate; up] weight stored in × out (a
    researcher's own: `w13[ids]` [S, H, 2I], rows as [S, 1, H]), index_add_ back into zeros."""

    def __init__(self, dim=64, intermediate=32, experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.w13 = _param(experts, dim, 2 * intermediate, scale=dim ** -0.5)
        self.w2 = _param(experts, intermediate, dim, scale=intermediate ** -0.5)

    def forward(self, x):
        T = x.shape[0]
        logits = self.router(x)
        vals, ids = logits.topk(self.top_k, dim=1)
        probs = vals.softmax(dim=1)
        flat_ids = ids.flatten()
        rows = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)  # [S, 1, H]
        h = torch.bmm(rows, self.w13[flat_ids]).squeeze(1)
        gate, up = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2:]
        a = F.gelu(gate, approximate="tanh") * up
        y = torch.bmm(a.unsqueeze(1), self.w2[flat_ids]).squeeze(1)
        y = y * probs.reshape(-1, 1)
        out = torch.zeros_like(x)
        token = torch.arange(T, device=x.device).repeat_interleave(self.top_k)
        return out.index_add_(0, token, y)


class ResearchGroupedMoE(nn.Module):
    """The most common research spelling of a grouped-GEMM MoE: argsort of the flat ids, counts by bincount,
    `x[order // K]`, `F.grouped_mm` (or `torch._grouped_mm`) for up (fused [gate; up], in × out) and down,
    SwiGLU by chunk, un-permute by index assignment, weighted sum over K of a [T, K, H] view."""

    def __init__(self, dim=64, intermediate=32, experts=8, top_k=2, grouped_mm=None):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_up = _param(experts, dim, 2 * intermediate, scale=dim ** -0.5)
        self.w_down = _param(experts, intermediate, dim, scale=intermediate ** -0.5)
        self.grouped_mm = grouped_mm or torch._grouped_mm

    def forward(self, x):
        T, H = x.shape
        probs = self.router(x).softmax(dim=-1)
        topw, topi = probs.topk(self.top_k, dim=-1)
        topw = topw / topw.sum(-1, keepdim=True)
        flat = topi.reshape(-1)
        order = torch.argsort(flat)
        counts = torch.bincount(flat, minlength=self.num_experts)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[order // self.top_k]
        gate, up = self.grouped_mm(xs, self.w_up, offs=offs).chunk(2, dim=-1)
        ys = self.grouped_mm(F.silu(gate) * up, self.w_down, offs=offs)
        unsorted = torch.empty_like(ys)
        unsorted[order] = ys
        return (unsorted.view(T, self.top_k, H) * topw.unsqueeze(-1).to(ys.dtype)).sum(dim=1)


class DenseMatmulMoE(nn.Module):
    """Dense all-expert compute spelled with matmul on an [E, T, H] broadcast (every expert on every token),
    weights [E, H, I] in × out, a plain ReLU MLP, the routing weights scattered into a dense [T, E] gate matrix
    and contracted by einsum 'eth,te->th'."""

    def __init__(self, dim=64, intermediate=32, experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w_in = _param(experts, dim, intermediate, scale=dim ** -0.5)
        self.w_out = _param(experts, intermediate, dim, scale=intermediate ** -0.5)

    def forward(self, x):
        scores = self.gate(x).softmax(-1)
        w, i = scores.topk(self.top_k, -1)
        dense = torch.zeros_like(scores).scatter(-1, i, w)
        hidden = F.relu(torch.matmul(x.unsqueeze(0), self.w_in))  # [E, T, I]
        y = torch.matmul(hidden, self.w_out)  # [E, T, H]
        return torch.einsum("eth,te->th", y, dense)


class CapacityMoE(nn.Module):
    """GShard / Switch / ST-MoE style capacity dispatch (lucidrains' st-moe-pytorch, mixture-of-experts;
    DeepSpeed, Tutel): one-hot masks, each pair's position in its expert by cumsum, pairs past the capacity
    dropped, dispatch and combine tensors [T, E, C] contracted by einsum, experts on [E, C, H]."""

    def __init__(self, dim=64, intermediate=32, experts=8, top_k=2, capacity_factor=1.25):
        super().__init__()
        self.top_k, self.num_experts, self.capacity_factor = top_k, experts, capacity_factor
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = _param(experts, dim, intermediate, scale=dim ** -0.5)
        self.w2 = _param(experts, intermediate, dim, scale=intermediate ** -0.5)

    def forward(self, x):
        T = x.shape[0]
        E, K = self.num_experts, self.top_k
        capacity = max(1, int(self.capacity_factor * T * K / E))
        probs = self.gate(x).softmax(-1)
        gates, ids = probs.topk(K, dim=-1)
        mask = F.one_hot(ids, E).float()  # [T, K, E]
        position = (torch.cumsum(mask.reshape(T * K, E), dim=0).reshape(T, K, E) - 1.0) * mask
        mask = mask * (position < capacity).float()
        slot = F.one_hot(position.sum(-1).long().clamp(max=capacity - 1), capacity).float()  # [T, K, C]
        combine = torch.einsum("tk,tke,tkc->tec", gates, mask.to(gates.dtype), slot.to(gates.dtype))
        dispatch = (combine > 0).to(x.dtype)
        expert_in = torch.einsum("tec,th->ech", dispatch, x)
        h = F.gelu(torch.einsum("ech,ehi->eci", expert_in, self.w1))
        expert_out = torch.einsum("eci,eih->ech", h, self.w2)
        return torch.einsum("tec,ech->th", combine, expert_out)


class SortRoutedMoE(nn.Module):
    """Top-k spelled with a descending argsort and a slice, the router a bare weight and matmul, tokens kept
    [B, S, D], experts by einsum with a 4-D intermediate, gate/up cut by `split`, weights as a dense [B, S, E]
    gate matrix (no codebase in particular: the spelling none of the other forms uses)."""

    def __init__(self, dim=32, hidden=16, experts=6, top_k=2):
        super().__init__()
        self.k = top_k
        self.router_w = _param(experts, dim, scale=dim ** -0.5)
        self.wi = _param(experts, dim, 2 * hidden, scale=dim ** -0.5)
        self.wo = _param(experts, hidden, dim, scale=hidden ** -0.5)

    def forward(self, x):
        scores = torch.matmul(x, self.router_w.t()).float().softmax(-1)
        order = scores.argsort(dim=-1, descending=True)[..., : self.k]
        top = scores.gather(-1, order)
        gates = torch.zeros_like(scores).scatter(-1, order, top / top.sum(-1, keepdim=True))
        h = torch.einsum("bsd,edf->bsef", x, self.wi)
        u, g = h.split(h.shape[-1] // 2, dim=-1)
        y = torch.einsum("bsef,efd->bsed", u * F.gelu(g), self.wo)
        return torch.einsum("bsed,bse->bsd", y, gates.to(y.dtype))
