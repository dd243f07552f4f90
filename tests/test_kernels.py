import os

# Before triton or moefuse's kernels are imported: `triton.jit` picks the interpreter when a kernel is defined.
# (tests/conftest.py sets it too, for when another test module imports the kernels first.)
os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moefuse.kernels.combine import combine  # noqa: E402
from moefuse.kernels import grouped_gemm as gg  # noqa: E402
from moefuse.kernels.grouped_gemm import GemmConfig, grouped_gemm, weight_tma  # noqa: E402
from moefuse.kernels.moe import moe_forward  # noqa: E402
from moefuse.kernels.routing import routing_plan, routing_plan_reference  # noqa: E402
from moefuse.spec import Activation, MoESpec  # noqa: E402
from moefuse.testing import assert_parity  # noqa: E402

# Interpreter-sized tiles, so that the small shapes below still span several M-, N- and K-tiles per expert.
SMALL = GemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
# The same tiles on the persistent grid (INTERPRETER_SMS·programs_per_sm = 4 programs, each walking several
# tiles; groups of 2 M-tiles, so experts with 3 M-tiles end in a short group) with the weights by TMA where
# `weight_tma` allows it (the interpreter runs tensor descriptors): every case below runs both.
SMALL_PERSISTENT_TMA = dataclasses.replace(SMALL, persistent=True, group_m=2, tma=True)
CONFIGS = {"per_tile": SMALL, "persistent_tma": SMALL_PERSISTENT_TMA}

# fp32: how far moefuse's y may be from the float64 reference, and why. fp16 and bf16: derived, not tabled —
# moefuse's error within a small multiple of eager PyTorch's in the same dtype, both against the float64
# reference (`assert_matches_reference`, `moefuse.testing.assert_parity`).
TOLERANCES = {
    # fp32 in, fp32 accumulation, fp32 A and Y: only summation order differs from float64 (<= 64 terms of
    # ~1, a few ulp of 6e-8). Measured worst |err| / (1e-6 + 1e-6·|ref|) = 0.67 over every case × 6 seeds, so
    # 1e-5 has a 15× margin. (TF32 would be ~1e-3 off, but the interpreter's dot ignores input_precision:
    # that is checked on a GPU only.)
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
# bf16 through the interpreter's tl.dot by the shim conftest installs (moefuse.testing.install_interpreter_bf16_dot)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_matches_reference(y, dtype, *reference_args):
    """y against `reference_moe(*reference_args)` in float64: fp32 within TOLERANCES, fp16 / bf16 within
    `assert_parity`'s bound from eager's error (the same loop in `dtype`)."""
    expected = reference_moe(*reference_args)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), expected, **TOLERANCES[torch.float32])
    else:
        assert_parity(y, reference_moe(*reference_args, dtype=dtype), expected, dtype)


# ---------------------------------------------------------------------------------------------------------
# Activations and layouts
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def silu_mul(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def relu(x):
    return tl.maximum(x, 0.0)


@dataclass(frozen=True)
class ActivationCase:
    jit: object
    torch_fn: object
    expr: str


SWIGLU = ActivationCase(silu_mul, lambda g, u: torch.nn.functional.silu(g) * u, "silu(x0)*x1")
RELU = ActivationCase(relu, torch.relu, "relu(x0)")


def layout(name: str, inter: int) -> tuple[ActivationCase, tuple[tuple[int, int], ...], int]:
    """(activation, slices, up_rows) of a weight layout."""
    return {
        "gate_up": (SWIGLU, ((0, 1), (inter, 1)), 2 * inter),  # Mixtral/Qwen: w1 = [gate; up]
        "up_gate": (SWIGLU, ((inter, 1), (0, 1)), 2 * inter),  # [up; gate]: the gate is the second half
        "interleaved": (SWIGLU, ((0, 2), (1, 2)), 2 * inter),  # GPT-OSS: gate, up, gate, up, …
        "plain": (RELU, ((0, 1),), inter),  # non-GLU MLP
    }[name]


# ---------------------------------------------------------------------------------------------------------
# Reference: a deliberately naive loop over tokens and their experts, in float64
# ---------------------------------------------------------------------------------------------------------


def reference_moe(x, topk_ids, topk_w, w1, w2, b1, b2, act: ActivationCase, slices, inter, dtype=torch.float64):
    """y in float64; with `dtype` the same loop in that dtype — what eager PyTorch computes, rounding after every
    op (the eager side of `moefuse.testing.assert_parity`)."""
    T, K = topk_ids.shape
    E = w1.shape[0]
    y = torch.zeros(T, x.shape[1], dtype=dtype)
    cols = torch.arange(inter)
    for t in range(T):
        for k in range(K):
            e = int(topk_ids[t, k])
            if not 0 <= e < E:  # dropped id: no expert, no contribution
                continue
            h = w1[e].to(dtype) @ x[t].to(dtype)
            if b1 is not None:
                h = h + b1[e].to(dtype)
            a = act.torch_fn(*(h[off + step * cols] for off, step in slices))
            o = w2[e].to(dtype) @ a
            if b2 is not None:
                o = o + b2[e].to(dtype)
            y[t] += topk_w[t, k].to(dtype) * o
    return y


# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    T: int
    K: int
    E: int
    H: int
    I: int  # noqa: E741
    layout: str = "gate_up"
    bias: bool = False
    transposed: bool = False  # weights stored [E, in, out] and passed as a transposed view (no copy)
    ids: str = "random"  # random | skip_expert_1 | all_on_0 | every_expert | dropped
    strided_inputs: bool = False  # x, topk_ids, topk_w as non-contiguous views


CASES = {
    "T=1": Case(T=1, K=2, E=4, H=32, I=32),  # one token: every expert has 0 or 1 rows
    "expert_without_tokens": Case(T=24, K=2, E=6, H=32, I=32, ids="skip_expert_1"),  # counts[1] = 0: no tile
    "all_tokens_on_one_expert": Case(T=40, K=1, E=4, H=32, I=32, ids="all_on_0"),  # 3 tiles, then 3 empty
    "T_not_multiple_of_BLOCK_M": Case(T=37, K=2, E=3, H=32, I=32),  # partial last tile of each expert masked
    "K=E": Case(T=12, K=4, E=4, H=32, I=32, ids="every_expert"),  # every token visits every expert
    "glu_up_gate": Case(T=20, K=2, E=4, H=32, I=32, layout="up_gate"),  # [up; gate]: OFF0 = I
    "glu_interleaved": Case(T=20, K=2, E=4, H=32, I=32, layout="interleaved"),  # STEP = 2
    "non_glu_relu": Case(T=20, K=2, E=4, H=32, I=32, layout="plain"),  # NUM_INPUTS = 1 in the up GEMM
    "biases": Case(T=20, K=2, E=4, H=32, I=32, bias=True),  # b1 at both slices' rows, b2 after the down GEMM
    "biases_interleaved": Case(T=20, K=2, E=4, H=32, I=32, layout="interleaved", bias=True),  # bias rows step 2
    "transposed_weights": Case(T=20, K=2, E=4, H=32, I=32, transposed=True),  # stride_k != 1: swapped strides
    "H_I_not_multiples_of_tiles": Case(T=21, K=3, E=5, H=48, I=40, bias=True),  # masked N and K tails
    "dropped_ids": Case(T=20, K=2, E=4, H=32, I=32, ids="dropped"),  # -1 and E: no expert, no contribution
    "strided_inputs": Case(T=20, K=2, E=4, H=32, I=32, strided_inputs=True),  # views with row strides > width
    "large_E": Case(T=16, K=2, E=8, H=64, I=64, layout="interleaved", bias=True, transposed=True),
}


def make_ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, K, E = case.T, case.K, case.E
    if T == 0:
        return torch.empty(0, K, dtype=torch.int64)
    if case.ids == "every_expert":
        return torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
    if case.ids == "all_on_0":
        return torch.zeros(T, K, dtype=torch.int64)
    experts = [e for e in range(E) if not (case.ids == "skip_expert_1" and e == 1)]
    ids = torch.stack([torch.tensor(experts)[torch.randperm(len(experts), generator=gen)[:K]] for _ in range(T)])
    if case.ids == "dropped":
        ids[::3, 0] = -1
        ids[1::4, -1] = E
    return ids


def make_problem(case: Case, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    act, slices, up_rows = layout(case.layout, case.I)
    T, K, E, H, I = case.T, case.K, case.E, case.H, case.I  # noqa: E741

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(T, H)
    topk_ids = make_ids(case, gen).to(torch.int32 if seed % 2 else torch.int64)
    topk_w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    if case.transposed:
        w1 = randn(E, H, up_rows, scale=H**-0.5).transpose(1, 2)
        w2 = randn(E, I, H, scale=I**-0.5).transpose(1, 2)
    else:
        w1 = randn(E, up_rows, H, scale=H**-0.5)
        w2 = randn(E, H, I, scale=I**-0.5)
    b1 = randn(E, up_rows, scale=0.5) if case.bias else None
    b2 = randn(E, H, scale=0.5) if case.bias else None
    if case.strided_inputs:
        x = torch.cat([x, randn(T, 16)], dim=1)[:, :H]
        topk_ids = torch.cat([topk_ids, topk_ids], dim=1)[:, :K]
        topk_w = topk_w.t().contiguous().t()  # column-major [T, K]
    spec = MoESpec(
        num_experts=E, top_k=K, hidden=H, intermediate=I, up_rows=up_rows,
        activation=Activation(act.expr, slices), dtype=str(dtype).removeprefix("torch."),
        out_dtype=str(dtype).removeprefix("torch."), w1_bias=case.bias, w2_bias=case.bias,
    )
    return spec, act, (x, topk_ids, topk_w, w1, w2, b1, b2)


# ---------------------------------------------------------------------------------------------------------
# The whole forward against the reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_moe_forward_matches_reference(name, dtype, config):
    case = CASES[name]
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(case, dtype)
    y = moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=act.jit, config=CONFIGS[config])
    assert y.dtype == dtype and y.shape == (case.T, case.H)
    assert_matches_reference(y, dtype, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, case.I)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_config(dtype):
    # The GPU default tiles (BLOCK_M=64 > every expert's rows here): one partial tile per expert.
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(Case(T=30, K=2, E=4, H=64, I=64, bias=True), dtype)
    y = moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=act.jit)
    assert_matches_reference(y, dtype, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, 64)


def test_T_zero_returns_empty():
    # T=0: no launch at all, an empty [0, H] in the output dtype.
    spec, act, args = make_problem(Case(T=0, K=2, E=4, H=32, I=32), torch.float32)
    spec = MoESpec(**{**spec.__dict__, "out_dtype": "float16"})
    y = moe_forward(spec, *args, activation=act.jit, config=SMALL)
    assert y.shape == (0, 32) and y.dtype == torch.float16


def test_fp32_output_from_fp16_inputs():
    # out_dtype differs from dtype: the combine's fp32 sum is stored once, in fp32.
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(CASES["biases"], torch.float16)
    spec = MoESpec(**{**spec.__dict__, "out_dtype": "float32"})
    y = moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=act.jit, config=SMALL)
    assert y.dtype == torch.float32
    assert_matches_reference(y, torch.float16, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, 32)


def test_deterministic():
    # No atomics anywhere: two runs agree bit for bit.
    spec, act, args = make_problem(CASES["T_not_multiple_of_BLOCK_M"], torch.float32)
    first = moe_forward(spec, *args, activation=act.jit, config=SMALL)
    second = moe_forward(spec, *args, activation=act.jit, config=SMALL)
    assert torch.equal(first, second)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_host_sync(monkeypatch, config):
    # The host path must not read device values back: every way it could is made to raise. The persistent grid
    # is sized from S, E and the SM count, never from the counts.
    spec, act, args = make_problem(CASES["biases"], torch.float16 if config == "persistent_tma" else torch.float32)

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in the moefuse forward")

    for name in ("item", "tolist", "nonzero", "unique", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    monkeypatch.setattr(torch, "unique", sync)
    y = moe_forward(spec, *args, activation=act.jit, config=CONFIGS[config])
    monkeypatch.undo()
    assert_matches_reference(y, args[0].dtype, *args, act, spec.activation.slices, 32)


# ---------------------------------------------------------------------------------------------------------
# Pieces: the GEMM's unwritten rows, the combine's dropped pairs
# ---------------------------------------------------------------------------------------------------------


def test_combine_ignores_rows_of_dropped_pairs():
    # Rows >= offsets[E] are never written by the GEMMs; NaN there must not reach the output.
    ids = torch.tensor([[0, -1], [5, 1], [1, 0]])
    plan = routing_plan(ids, 2)
    y = torch.randn(6, 16, dtype=torch.float64).float()
    y[4:] = float("nan")
    w = torch.rand(3, 2)
    out = combine(y, w, plan, out_dtype=torch.float32)
    pos = routing_plan_reference(ids, 2).pair_pos.long().view(3, 2)
    kept = (ids >= 0) & (ids < 2)
    expected = sum(torch.where(kept[:, k, None], w[:, k, None] * y[pos[:, k]], 0.0) for k in range(2))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_down_gemm_writes_only_kept_rows():
    # No padded rows exist: the GEMM's output has S rows and the rows of dropped pairs stay untouched.
    ids = torch.tensor([[0, 2], [-1, 0], [1, 7]])
    plan = routing_plan(ids, 3)
    a = torch.randn(6, 32)
    w = torch.randn(3, 16, 32)
    c = grouped_gemm(a, w, plan, out_cols=16, config=SMALL)
    assert c.shape == (6, 16)
    ref = routing_plan_reference(ids, 3)
    experts = torch.repeat_interleave(torch.arange(3), ref.counts.long())
    kept = int(ref.offsets[-1])
    expected = torch.einsum("sk,snk->sn", a[:kept].double(), w[experts].double())
    torch.testing.assert_close(c[:kept].double(), expected, **TOLERANCES[torch.float32])


@triton.jit
def _schedule_probe(counts_ptr, out_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    # Row `tile` of out: (expert, M-tile within the expert, N-tile) as the persistent walk assigns them.
    experts, counts, tiles, tiles_end = gg.m_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in range(0, tl.sum(tiles, axis=0) * num_n):
        expert, tile_in_expert, pid_n = gg.schedule_tile(tile, num_n, experts, tiles, tiles_end, GROUP_M)
        tl.store(out_ptr + 3 * tile, expert)
        tl.store(out_ptr + 3 * tile + 1, tile_in_expert)
        tl.store(out_ptr + 3 * tile + 2, pid_n)


@pytest.mark.parametrize("group_m", [1, 2, 8])
def test_persistent_schedule_visits_every_tile_once_grouped(group_m):
    # Counts with an empty expert, partial tiles and an expert of 5 M-tiles (a short last group for 2 and 8).
    counts = torch.tensor([3, 0, 80, 16, 17], dtype=torch.int32)
    block_m, block_n, n = 16, 32, 96
    m_tiles = [-(-int(c) // block_m) for c in counts]
    total = sum(m_tiles) * 3
    out = torch.full((total, 3), -1, dtype=torch.int32)
    _schedule_probe[(1,)](counts, out, 5, n, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=8, GROUP_M=group_m)
    expected = {(e, m, j) for e in range(5) for m in range(m_tiles[e]) for j in range(3)}
    assert sorted(map(tuple, out.tolist())) == sorted(expected)  # a permutation of the output tiles
    assert out[:, 0].tolist() == sorted(out[:, 0].tolist())  # expert by expert
    for e in range(5):  # within an expert: N-tile j of a group's M-tiles follow each other (one weight panel)
        rows = [tuple(r) for r in out.tolist() if r[0] == e]
        for start in range(0, m_tiles[e], group_m):
            size = min(group_m, m_tiles[e] - start)
            group = rows[start * 3:(start + size) * 3]
            assert group == [(e, start + i, j) for j in range(3) for i in range(size)]


def test_weight_tma_selection(monkeypatch):
    # The host decides, from the config, target and weight strides, whether w_ptr is a tensor descriptor.
    tma = dataclasses.replace(SMALL, tma=True)
    gate_up = ((0, 1), (32, 1))
    shape, strides = (4, 64, 32), (64 * 32, 32, 1)
    assert weight_tma(tma, gate_up, shape, strides, 2, capability=90)
    assert weight_tma(tma, gate_up, shape, strides, 2, capability=None)  # the interpreter
    assert not weight_tma(SMALL, gate_up, shape, strides, 2, capability=90)  # not asked for
    assert not weight_tma(tma, gate_up, shape, strides, 2, capability=80)  # no TMA before sm_90
    assert not weight_tma(tma, gate_up, shape, strides, 4, capability=90)  # fp32: FMA path
    assert not weight_tma(tma, ((0, 2), (1, 2)), shape, strides, 2, capability=90)  # interleaved rows
    assert not weight_tma(tma, gate_up, (4, 64, 32), (64 * 32, 1, 64), 2, capability=90)  # transposed
    assert not weight_tma(tma, gate_up, (4, 64, 36), (64 * 36, 36, 1), 2, capability=90)  # 72-byte row pitch
    assert not weight_tma(tma, gate_up, shape, (2 * 64 * 32, 32, 1), 2, capability=90)  # experts not adjacent

    # And the launch follows it: descriptors for [gate; up] and the down GEMM, none for the transposed case.
    made = []
    real = gg.TensorDescriptor
    monkeypatch.setattr(gg, "TensorDescriptor", lambda *args: made.append(args) or real(*args))
    for name, descriptors in (("biases", 2), ("glu_interleaved", 1), ("transposed_weights", 0)):
        made.clear()
        spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(CASES[name], torch.float16)
        y = moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=act.jit, config=SMALL_PERSISTENT_TMA)
        assert len(made) == descriptors, name
        assert_matches_reference(y, torch.float16, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, 32)


# ---------------------------------------------------------------------------------------------------------
# Routing plan: exactly the reference's, pair for pair
# ---------------------------------------------------------------------------------------------------------


def assert_same_plan(plan, ref):
    for field in ("counts", "offsets", "sorted_pairs", "pair_pos"):
        got, want = getattr(plan, field), getattr(ref, field)
        assert got.dtype == torch.int32, field
        assert torch.equal(got, want), f"{field}: {got.tolist()} != {want.tolist()}"
    assert (plan.num_experts, plan.top_k) == (ref.num_experts, ref.top_k)


ROUTING_CASES = {
    "T=1": (torch.tensor([[2, 0]]), 4),  # a single token
    "one_expert": (torch.zeros(9, 1, dtype=torch.int64), 1),  # E=1: everything in one segment
    "empty_experts": (torch.tensor([[3, 0], [0, 3], [3, 0]]), 5),  # experts 1, 2, 4 get no pairs
    "dropped_ids": (torch.tensor([[-1, 2], [4, 1], [2, -7], [1, 2]]), 4),  # -1, 4, -7 sort last, stably
    "E_power_of_two_minus_one": (torch.randint(0, 7, (33, 3), generator=torch.Generator().manual_seed(1)), 7),
    "many_blocks": (torch.randint(0, 64, (300, 8), generator=torch.Generator().manual_seed(2)), 64),  # NB > 1
    # E+1 > 256 buckets: 16-pair blocks, 75 of them, so the scan loops over blocks and runs 5 bucket programs.
    "E_above_256": (torch.randint(-1, 300, (300, 4), generator=torch.Generator().manual_seed(3)), 300),
    "T=0": (torch.empty(0, 2, dtype=torch.int64), 4),  # no pairs: counts and offsets all zero
}


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name", list(ROUTING_CASES))
def test_routing_plan_matches_reference(name, ids_dtype):
    ids, E = ROUTING_CASES[name]
    ids = ids.to(ids_dtype)
    assert_same_plan(routing_plan(ids, E), routing_plan_reference(ids, E))


def test_routing_plan_strided_ids():
    # topk_ids as a column-major view: read through its strides, no copy needed.
    ids = torch.randint(0, 6, (3, 17), generator=torch.Generator().manual_seed(4)).t()
    assert not ids.is_contiguous()
    assert_same_plan(routing_plan(ids, 6), routing_plan_reference(ids, 6))


@settings(max_examples=100, deadline=None, derandomize=True)  # CI draws the same examples every run
@given(
    T=st.integers(0, 40),
    K=st.integers(1, 8),
    E=st.integers(1, 70),
    dropped=st.booleans(),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_routing_plan_random(T, K, E, dropped, ids_dtype, seed):
    low, high = (-2, E + 2) if dropped else (0, E)
    ids = torch.randint(low, high, (T, K), generator=torch.Generator().manual_seed(seed)).to(ids_dtype)
    assert_same_plan(routing_plan(ids, E), routing_plan_reference(ids, E))


def test_routing_reference_is_stable_sort():
    # The oracle itself: within an expert the pairs keep increasing pair index, dropped ones come last.
    ref = routing_plan_reference(torch.tensor([[1, 0], [1, -1], [0, 1]]), 2)
    assert ref.sorted_pairs.tolist() == [1, 4, 0, 2, 5, 3]
    assert ref.offsets.tolist() == [0, 2, 5]


# ---------------------------------------------------------------------------------------------------------
# Errors name the tensor, what was expected and what came
# ---------------------------------------------------------------------------------------------------------


def test_errors_name_tensor_and_shapes():
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(CASES["biases"], torch.float32)
    with pytest.raises(ValueError, match=r"w1: expected shape \(4, 64, 32\), got \(4, 64, 16\)"):
        moe_forward(spec, x, ids, w, w1[..., :16], w2, b1, b2, activation=act.jit)
    with pytest.raises(ValueError, match=r"topk_w: expected shape \(20, 2\), got \(20, 3\)"):
        moe_forward(spec, x, ids, torch.ones(20, 3), w1, w2, b1, b2, activation=act.jit)
    with pytest.raises(ValueError, match=r"x: expected dtype torch.float32, got torch.float16"):
        moe_forward(spec, x.half(), ids, w, w1, w2, b1, b2, activation=act.jit)
    with pytest.raises(ValueError, match=r"b2: the spec says w2_bias=True but b2 is None"):
        moe_forward(spec, x, ids, w, w1, w2, b1, None, activation=act.jit)
    with pytest.raises(ValueError, match=r"activation: expected a @triton.jit function"):
        moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=torch.relu)
    with pytest.raises(ValueError, match=r"topk_ids: expected dtype"):
        routing_plan(ids.float(), 4)
    with pytest.raises(ValueError, match=r"GemmConfig.block_m=24"):
        GemmConfig(block_m=24, block_n=32, block_k=32, num_warps=4, num_stages=2)


# ---------------------------------------------------------------------------------------------------------
# The same cases through the op's other paths: the CPU path, and the op with its generated epilogue
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_path_matches_reference(name, dtype):
    from moefuse.runtime.cpu import moe_forward_cpu

    case = CASES[name]
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(case, dtype)
    y = moe_forward_cpu(spec, x, ids, w, w1, w2, b1, b2)
    assert y.dtype == dtype and y.shape == (case.T, case.H)
    assert_matches_reference(y, dtype, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, case.I)


@pytest.mark.parametrize("name", ["T_not_multiple_of_BLOCK_M", "glu_interleaved", "non_glu_relu", "biases"])
def test_op_runs_the_generated_epilogue(name):
    # moefuse::moe under TRITON_INTERPRET=1: the epilogue is generated from spec.activation.expr (not the
    # hand-written jit functions above) and the op dispatches to the Triton kernels.
    from moefuse.runtime import op

    case = CASES[name]
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(case, torch.float32)
    before = op.counters["triton"]
    y = op.moe_call(spec, x, ids, w, w1, w2, b1, b2)
    assert op.counters["triton"] == before + 1
    assert_matches_reference(y, torch.float32, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices, case.I)


def test_cpu_torch_plan_uses_grouped_mm_where_torch_takes_it(monkeypatch):
    # The torch plan (where the generated C++ cannot run) makes one grouped_mm per projection on aligned
    # operands, the per-expert loop elsewhere: same numbers either way.
    from moefuse.runtime import cpu

    monkeypatch.setenv("MOEFUSE_CPU_KERNELS", "0")
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec, act, (x, ids, w, w1, w2, b1, b2) = make_problem(CASES["biases"], torch.float32)
    y = cpu.moe_forward_cpu(spec, x, ids, w, w1, w2, b1, b2)
    assert len(calls) == 2
    assert not cpu._grouped_mm_takes(torch.ones(1, 1)) and not cpu._grouped_mm_takes(torch.ones(4, 3))
    assert_matches_reference(y, torch.float32, x, ids, w, w1, w2, b1, b2, act, spec.activation.slices,
                             CASES["biases"].I)
