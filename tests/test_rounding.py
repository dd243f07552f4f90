"""Token rounding (issue #5): `moefuse.rounding.round_routing` against a naive plain-Python reference, its
invariants as properties, no host sync, and the backend option end to end on tiny HF models."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefuse.errors import OptionsError
from moefuse.rounding import max_pairs, round_routing

MODES = ("off", "up", "down", "nearest")


# ----------------------------------------------------------------------------------------------------------
# The reference: deliberately naive Python over lists, one expert column at a time
# ----------------------------------------------------------------------------------------------------------


def reference_target(f: int, mode: str, m: int, t: int) -> int:
    multiples = [j * m for j in range(t // m + 2)]
    if mode == "up":
        target = min(c for c in multiples if c >= f)
    elif mode == "down":
        target = max(c for c in multiples if c <= f)
    else:  # nearest; on a tie the larger multiple
        target = min(multiples, key=lambda c: (abs(c - f), -c))
    return min(target, t)


def reference_rounding(scores, topk_ids, topk_weights, mode: str, m: int) -> list[tuple[int, int, float]]:
    """Kept (token, expert, weight) triples, token-major: top-K order for "off", by expert id otherwise."""
    ids, w = topk_ids.tolist(), topk_weights.tolist()
    if mode == "off":
        return [(t, ids[t][k], w[t][k]) for t in range(len(ids)) for k in range(len(ids[t]))]
    score = scores.tolist()
    score_as_weight = scores.to(topk_weights.dtype).tolist()
    T, E = len(score), len(score[0])
    chosen = {(t, ids[t][k]): w[t][k] for t in range(T) for k in range(len(ids[t]))}
    kept = []
    for e in range(E):
        f = sum(1 for t in range(T) if (t, e) in chosen)
        ranked = sorted(range(T), key=lambda t: ((t, e) not in chosen, -chosen.get((t, e), score[t][e]), t))
        for t in ranked[:reference_target(f, mode, m, T)]:
            kept.append((t, e, chosen[(t, e)] if (t, e) in chosen else score_as_weight[t][e]))
    return sorted(kept)


def used(pairs) -> list[tuple[int, int, float]]:
    n = int(pairs.token_offsets[-1])
    return list(zip(pairs.token[:n].tolist(), pairs.expert[:n].tolist(), pairs.weight[:n].tolist()))


# ----------------------------------------------------------------------------------------------------------
# Random routing with many ties (scores and weights on a coarse grid), or softmax routing
# ----------------------------------------------------------------------------------------------------------


@st.composite
def routings(draw):
    T = draw(st.integers(1, 48))
    E = draw(st.integers(2, 9))
    K = draw(st.integers(1, min(E, 4)))
    M = draw(st.sampled_from([16, 32, 64]))
    coarse = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if coarse:  # ties in scores and in weights
        scores = torch.randint(0, 6, (T, E), generator=g).float() / 8
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
        weights = (torch.randint(1, 4, (T, K), generator=g).float() / 4).to(dtype)
    else:  # the router's way: softmax, top-k, renormalise
        scores = torch.softmax(torch.randn(T, E, generator=g) * 2, -1)
        top, ids = scores.topk(K, -1)
        weights = (top / top.sum(-1, keepdim=True)).to(dtype)
    return scores, ids, weights, M


@settings(max_examples=150, deadline=None, derandomize=True)  # CI draws the same examples every run
@given(routings(), st.sampled_from(MODES))
def test_matches_reference_and_invariants(routing, mode):
    scores, ids, weights, M = routing
    T, E = scores.shape
    K = ids.shape[1]
    pairs = round_routing(scores, ids, weights, mode, M)
    got = used(pairs)
    assert got == reference_rounding(scores, ids, weights, mode, M)  # pair for pair, weights bit-exact

    # the contract's layout
    s_max = T * K if mode == "off" else max_pairs(T, K, E, M)
    assert all(p.shape[0] == s_max for p in (pairs.token, pairs.expert, pairs.weight))
    assert pairs.token.dtype == pairs.expert.dtype == pairs.token_offsets.dtype == torch.int32
    assert pairs.weight.dtype == weights.dtype
    n = len(got)
    assert (pairs.expert[n:] == -1).all() and (pairs.weight[n:] == 0).all()
    assert (pairs.token.diff() >= 0).all() and int(pairs.token.max()) < T
    offs = pairs.token_offsets.tolist()
    assert offs[0] == 0 and all(pairs.token[offs[t]:offs[t + 1]].eq(t).all() for t in range(T))
    assert len({(t, e) for t, e, _ in got}) == n  # no duplicate (token, expert)

    if mode == "off":
        assert got == [(t, e, w) for t in range(T) for e, w in zip(ids[t].tolist(), weights[t].tolist())]
        return
    chosen = {(t, e): w for t in range(T) for e, w in zip(ids[t].tolist(), weights[t].tolist())}
    kept = {(t, e) for t, e, _ in got}
    for e in range(E):
        f = sum(1 for t in range(T) if (t, e) in chosen)
        count = sum(1 for t in range(T) if (t, e) in kept)
        assert count % M == 0 or count == T, (e, f, count)
        assert abs(count - f) < M
        if mode == "up":
            assert count >= f
        if mode == "down":
            assert count <= f
        kept_sel = [chosen[(t, e)] for t in range(T) if (t, e) in chosen and (t, e) in kept]
        dropped = [chosen[(t, e)] for t in range(T) if (t, e) in chosen and (t, e) not in kept]
        added = [scores[t, e].item() for t in range(T) if (t, e) not in chosen and (t, e) in kept]
        others = [scores[t, e].item() for t in range(T) if (t, e) not in chosen and (t, e) not in kept]
        assert not (dropped and added)
        if dropped and kept_sel:  # the dropped ones are the lowest-weighted selected ones
            assert max(dropped) <= min(kept_sel)
        if added and others:  # the added ones are the highest-scoring unselected ones
            assert min(added) >= max(others)


def test_nearest_ties_round_up_and_counts_cap_at_tokens():
    # M = 16, 32 tokens: expert 0 chosen by 8 = ½·M and expert 2 by 24 = 1½·M, ties nearest rounds up.
    T, M = 32, 16
    ids = torch.tensor([[0, 1] if t < 8 else [1, 2] for t in range(T)])
    scores = torch.softmax(torch.randn(T, 3), -1)
    weights = torch.full((T, 2), 0.5)
    count = {m: torch.bincount(used_experts(round_routing(scores, ids, weights, m, M)), minlength=3).tolist()
             for m in ("up", "down", "nearest")}
    assert count["nearest"] == [16, 32, 32] and count["down"] == [0, 32, 16] and count["up"] == [16, 32, 32]
    # T < M: up fills an expert with every token (capped at T), down removes every pair
    small = round_routing(scores[:5], ids[:5], weights[:5], "up", 64)
    assert torch.bincount(used_experts(small), minlength=3).tolist() == [5, 5, 0]  # expert 2: none chose it
    assert int(round_routing(scores[:5], ids[:5], weights[:5], "down", 64).token_offsets[-1]) == 0


def used_experts(pairs) -> torch.Tensor:
    return pairs.expert[: int(pairs.token_offsets[-1])].long()


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
def test_gradients_reach_weights_of_kept_selected_and_scores_of_added_pairs(mode):
    torch.manual_seed(0)
    T, E, K, M = 24, 4, 2, 16
    logits = torch.randn(T, E, requires_grad=True)
    scores = torch.softmax(logits, -1)
    scores.retain_grad()
    top, ids = scores.topk(K, -1)
    weights = (top / top.sum(-1, keepdim=True)).detach().requires_grad_()
    pairs = round_routing(scores, ids, weights, mode, M)
    coef = torch.randn(pairs.weight.shape[0])
    (pairs.weight * coef).sum().backward()
    kept = {(t, e): i for i, (t, e, _) in enumerate(used(pairs))}
    chosen = {(t, e.item()) for t in range(T) for e in ids[t]}
    for t in range(T):
        for k in range(K):
            key = (t, ids[t, k].item())
            assert weights.grad[t, k] == (coef[kept[key]] if key in kept else 0)
        for e in range(E):
            added = (t, e) in kept and (t, e) not in chosen
            assert scores.grad[t, e] == (coef[kept[(t, e)]] if added else 0)
    if mode == "up":
        assert any((t, e) not in chosen for t, e in kept)  # added pairs occur
    if mode == "down":
        assert any(c not in kept for c in chosen)  # dropped pairs occur
    assert logits.grad is not None  # and on into the router


def test_no_host_sync(monkeypatch):
    """No `.item()`, `.tolist()`, truth test, int()/float() of a tensor or nonzero; and it runs on the meta
    device, where any data-dependent output shape (boolean masks, unique, tensor repeats) would raise."""
    T, E, K = 40, 8, 2
    scores = torch.softmax(torch.randn(T, E), -1)
    top, ids = scores.topk(K, -1)

    def sync(*args, **kwargs):
        raise AssertionError("host sync in round_routing")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    with pytest.raises(AssertionError, match="host sync"):
        bool(scores[0, 0])  # the guard works
    for mode in MODES:
        round_routing(scores, ids, top, mode, 16)
        meta = round_routing(scores.to("meta"), ids.to("meta"), top.to("meta"), mode, 16)
        assert meta.token.shape[0] == (T * K if mode == "off" else max_pairs(T, K, E, 16))


def test_bad_arguments():
    scores = torch.rand(4, 3)
    ids, w = torch.tensor([[0]] * 4), torch.ones(4, 1)
    with pytest.raises(OptionsError, match="must be one of"):
        round_routing(scores, ids, w, "ceil", 16)
    with pytest.raises(OptionsError, match="power of two"):
        round_routing(scores, ids, w, "up", 24)
    # an expert no token chose stays empty even under "up" (⌈0/M⌉ = 0): the 4 pairs of expert 0 only
    assert used(round_routing(scores, ids, w, "up", 16)) == [(t, 0, 1.0) for t in range(4)]


# ----------------------------------------------------------------------------------------------------------
# End to end: the backend option on tiny HF models, against plain PyTorch applying the reference routing
# ----------------------------------------------------------------------------------------------------------

M_E2E = 16  # the smallest tile: with 2·12 tokens and 8 experts every mode really changes the routing


def reference_block_forward(block, mode: str, m: int):
    """A plain-PyTorch MoE block (Qwen3-MoE / Mixtral / OLMoE layout) whose routing is `reference_rounding`'s:
    every expert on every token, weighted by the rounded routing (0 off it), so gradients reach the router."""
    def forward(hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        logits, weights, ids = block.gate(x)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # what these routers take top-k over
        T, E = scores.shape
        keep = torch.zeros(T, E, dtype=torch.bool)
        for t, e, _ in reference_rounding(scores.detach(), ids, weights.detach(), mode, m):
            keep[t, e] = True
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter(1, ids, True)
        dense = torch.where(chosen, torch.zeros(T, E, dtype=weights.dtype).scatter(1, ids, weights),
                            scores.to(weights.dtype)) * keep
        ex = block.experts
        y = torch.zeros_like(x)
        for e in range(E):
            gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            y = y + dense[:, e, None] * torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[e])
        return y.reshape(b, s, h)
    return forward


def rounded_reference(model, mode: str, m: int):
    import copy

    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "gate") and hasattr(module, "experts"):
            module.forward = reference_block_forward(module, mode, m)
    return ref


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def pairs_calls(path: str) -> int:
    """Calls of the flat-pairs training op's forward and backward on `path` ("cpu" / "triton")."""
    from moefuse.runtime import op as moe_op

    return moe_op.counters[f"pairs_fwd_train_{path}"] + moe_op.counters[f"pairs_bwd_{path}"]


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("family,mode,path", [("qwen3_moe", "nearest", "cpu"), ("mixtral", "up", "cpu"),
                                              ("olmoe", "down", "cpu"), ("qwen3_moe", "nearest", "triton")])
def test_backend_rounds_tokens_forward_and_backward(family, mode, path, monkeypatch):
    from moefuse import Backend
    from moefuse.testing import num_moe_layers, rel_err, tiny_model

    if path == "triton":  # the flat-pairs op's Triton kernels, on the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_model(family).train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = loss_and_grads(rounded_reference(model, mode, M_E2E), ids)
    exact_logits = model(ids).logits.detach()
    backend = Backend({"inner": "eager", "token_rounding": mode, "tile_m": M_E2E})
    before = pairs_calls(path)
    logits, grads = loss_and_grads(torch.compile(model, backend=backend), ids)
    lowered = backend.explanation.lowered
    assert len(lowered) == num_moe_layers(model) == 2, str(backend.explanation)
    assert all(lw.rounding == mode and lw.tile_m == M_E2E for lw in lowered)
    assert str(backend.explanation).count(f"TOKEN ROUNDING {mode!r} to multiples of M={M_E2E}") == 2
    assert pairs_calls(path) - before == 4  # the flat-pairs op ran on `path`: forward and backward of both layers
    assert rel_err(logits, ref_logits) <= 1e-4
    assert rel_err(logits, exact_logits) > 1e-2  # rounding really changed the routing
    assert grads.keys() == ref_grads.keys()
    assert any(n.endswith("gate.weight") for n in grads)  # the router's gradient is among those checked
    worst = max(ref_grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    assert rel_err(grads[worst], ref_grads[worst]) <= 1e-4, worst


@pytest.mark.usefixtures("cpu_path")
def test_backend_rounding_off_is_exact_and_unfound_scores_lower_exactly():
    """"off" lowers exact top-K; a router that takes top-k over raw logits (GPT-OSS) is lowered exactly with
    rounding on, and the report says why."""
    from moefuse import Backend
    from moefuse.runtime import op as moe_op
    from moefuse.testing import rel_err, tiny_model

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for family, options in (("qwen3_moe", {"token_rounding": "off"}), ("gpt_oss", {"token_rounding": "nearest"})):
        model = tiny_model(family)
        with torch.no_grad():
            ref = model(ids).logits
            backend = Backend({"inner": "eager", "tile_m": M_E2E, **options})
            before = moe_op.counters["cpu"]
            got = torch.compile(model, backend=backend)(ids).logits
        lowered = backend.explanation.lowered
        assert len(lowered) == 2 and moe_op.counters["cpu"] - before == 2, str(backend.explanation)
        assert all(lw.rounding == "off" for lw in lowered) and "TOKEN ROUNDING" not in str(backend.explanation)
        assert rel_err(got, ref) <= 1e-5
        if family == "gpt_oss":
            assert all("raw router logits" in lw.rounding_skipped for lw in lowered)
            assert str(backend.explanation).count("token rounding not applied, exact top-K") == 2
        torch._dynamo.reset()


@pytest.mark.usefixtures("cpu_path")
def test_backend_rounding_leaves_layers_converted_before_exact_and_says_so():
    """A model `moefuse.convert` already gave the exact op has no router scores at the op: compiled with
    rounding on, its layers stay exact top-K and the report says why."""
    import moefuse
    from moefuse import Backend
    from moefuse.runtime import op as moe_op
    from moefuse.testing import rel_err, tiny_model

    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        assert len(moefuse.convert(model).converted) == 2
        backend = Backend({"inner": "eager", "token_rounding": "nearest", "tile_m": M_E2E})
        before = moe_op.counters["cpu"]
        got = torch.compile(model, backend=backend)(ids).logits
    lowered = backend.explanation.lowered
    assert len(lowered) == 2 and all(lw.by_convert for lw in lowered), str(backend.explanation)
    assert moe_op.counters["cpu"] - before == 2
    assert all("moefuse.convert put the exact op here" in lw.rounding_skipped for lw in lowered)
    assert rel_err(got, ref) <= 1e-5
