"""Gate and up as two expert tensors (`MoESpec.w3`: w1 [E, I, H] the gate, w3 [E, I, H] the up — torchtitan,
gpt-fast, Mistral), forward and every gradient, on the CPU plan and on the Triton kernels under the interpreter:

  - the spec and the input checks (what a split spec accepts, the errors that name the wrong tensor);
  - `moefuse::moe` and its training pair against a deliberately naive float64 per-token loop differentiated by
    torch.autograd, both activation orders (silu(x0)*x1 reading [w1; w3], x0*silu(x1) reading [w3; w1]);
  - the kernels with interpreter-sized tiles (several M-, N-, K-tiles), on the per-tile and the persistent +
    TMA grids; flat pairs (`moefuse::moe_pairs`).

fp32 is held to the float64 reference (only summation order differs); fp16 to twice the error a plain fp16
torch implementation of the same layer makes against the same reference (see `assert_fp16_like_torch`).
Every op-level test asserts through `op.counters` that the fused op ran, and on which path.
"""
import os

# Before triton or moefuse's kernels are imported: `triton.jit` picks the interpreter when a kernel is defined.
os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_kernels import CONFIGS, make_ids  # noqa: E402

from moefuse.errors import InputError  # noqa: E402
from moefuse.inputs import check_layer_inputs  # noqa: E402
from moefuse.kernels.backward import moe_backward  # noqa: E402
from moefuse.kernels.codegen import load_activation  # noqa: E402
from moefuse.kernels.moe import moe_forward  # noqa: E402
from moefuse.rounding import exact_pairs  # noqa: E402
from moefuse.runtime import op  # noqa: E402
from moefuse.runtime.op import moe_call  # noqa: E402
from moefuse.runtime.pairs import FlatPairs, fused_moe_pairs  # noqa: E402
from moefuse.runtime.tuning import tuning_key  # noqa: E402
from moefuse.spec import Activation, MoESpec  # noqa: E402

DTYPES = (torch.float32, torch.float16)  # never bf16 here: the interpreter's tl.dot multiplies bf16's raw bits
PATHS = ("cpu", "triton")
GRADS = ("x", "topk_w", "w1", "w3", "w2", "b2")

# fp32 in, every product and sum in fp32: only summation order differs from float64 (sums of <= 48 terms, two
# GEMMs deep for dx). Error relative to the largest entry, as in test_autograd: measured worst 6.3e-7 over every
# case × both activations × 3 seeds, both paths: a 16× margin.
FP32_REL = 1e-5
# fp16: moefuse's error against float64 may be at most this multiple of a plain fp16 torch implementation's
# (`plain_fp16`): both round h (or gate/up), A, dH and every output to fp16, so the same order of error is
# expected. Errors are norm-wise, ‖got − ref‖ / ‖ref‖: measured worst ratio 1.65 (dtopk_w at T=1, two entries)
# over every case × both activations × 6 seeds, both paths. The largest-entry metric is too noisy for a ratio:
# at T=1 each dW entry carries one or two roundings, and the ratio of two such maxima reached 2.19 (dW3, seed 2)
# with neither implementation more than one fp16 ulp off.
FP16_FACTOR = 2.0


# ---------------------------------------------------------------------------------------------------------
# Activations: the gate is w1's rows in both, read as the first or as the second input
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    expr: str
    gate_first: bool  # slices ((0, 1), (I, 1)): x0 = w1's rows; else ((I, 1), (0, 1)): x0 = w3's rows

    def slices(self, inter: int) -> tuple[tuple[int, int], ...]:
        return ((0, 1), (inter, 1)) if self.gate_first else ((inter, 1), (0, 1))

    def torch_fn(self, x0, x1):
        return F.silu(x0) * x1 if self.gate_first else x0 * F.silu(x1)


ACTS = {
    "silu(x0)*x1": Act("silu(x0)*x1", gate_first=True),  # [w1; w3]: x0 = gate
    "x0*silu(x1)": Act("x0*silu(x1)", gate_first=False),  # [w3; w1]: the slices' order swapped, x1 = gate
}


# ---------------------------------------------------------------------------------------------------------
# Problems, each labelled with the edge it covers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    T: int
    K: int
    E: int
    H: int
    I: int  # noqa: E741
    ids: str = "random"  # test_kernels.make_ids: random | skip_expert_1 | all_on_0 | every_expert | dropped
    b2: bool = False  # the down-projection's bias (b1 is not supported with w3: the spec rejects it)
    transposed: bool = False  # w1, w3, w2 stored [E, in, out] and passed as transposed views (no copy)


CASES = {
    "T=1": Case(T=1, K=2, E=4, H=32, I=32),  # one token: every expert has 0 or 1 rows
    "expert_without_tokens": Case(T=12, K=2, E=4, H=32, I=32, ids="skip_expert_1"),  # counts[1] = 0: no tile
    "K=E": Case(T=6, K=3, E=3, H=32, I=32, ids="every_expert"),  # every token visits every expert
    "all_tokens_on_one_expert": Case(T=20, K=1, E=3, H=32, I=32, ids="all_on_0"),  # 2 tiles at BLOCK_M=16
    "H_I_not_multiples_of_tiles_b2": Case(T=9, K=2, E=3, H=48, I=40, b2=True),  # masked N, K tails; ⟨dy, b2⟩
    "transposed_weights_dropped_ids": Case(T=8, K=2, E=4, H=32, I=32, ids="dropped", transposed=True),
}


def make_problem(case: Case, act: Act, dtype: torch.dtype, seed: int = 0):
    """(spec, (x, topk_ids, topk_w, w1, w3, w2, b2)) with the spec of a split up-projection."""
    gen = torch.Generator().manual_seed(seed)
    T, K, E, H, I = case.T, case.K, case.E, case.H, case.I  # noqa: E741

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def weight(e, out, inp):
        if case.transposed:
            return randn(e, inp, out, scale=inp**-0.5).transpose(1, 2)
        return randn(e, out, inp, scale=inp**-0.5)

    x = randn(T, H)
    ids = make_ids(case, gen).to(torch.int32 if seed % 2 else torch.int64)
    topk_w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    w1, w3, w2 = weight(E, I, H), weight(E, I, H), weight(E, H, I)
    b2 = randn(E, H, scale=0.5) if case.b2 else None
    name = str(dtype).removeprefix("torch.")
    spec = MoESpec(num_experts=E, top_k=K, hidden=H, intermediate=I, up_rows=2 * I,
                   activation=Activation(act.expr, act.slices(I)), dtype=name, out_dtype=name, w2_bias=case.b2,
                   w3=True)
    return spec, (x, ids, topk_w, w1, w3, w2, b2)


# ---------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------


def reference_moe(x, topk_ids, topk_w, w1, w3, w2, b2, act: Act):
    """Deliberately naive, in float64: for each token and each of its experts, gate = w1[e]·x, up = w3[e]·x."""
    T, K = topk_ids.shape
    E = w1.shape[0]
    y = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(topk_ids[t, k])
            if not 0 <= e < E:  # dropped id: no expert, no contribution
                continue
            gate = w1[e].double() @ x[t].double()
            up = w3[e].double() @ x[t].double()
            a = F.silu(gate) * up if act.gate_first else up * F.silu(gate)
            o = w2[e].double() @ a
            if b2 is not None:
                o = o + b2[e].double()
            y[t] += topk_w[t, k].double() * o
    return y


def plain_fp16(x, topk_ids, topk_w, w1, w3, w2, b2, act: Act):
    """What a user would write in fp16 torch (the baseline of the fp16 bounds): per expert, its tokens' gate and
    up projections, the activation and the down projection in the input dtype, summed into y in that dtype."""
    E = w1.shape[0]
    y = torch.zeros_like(x)
    for e in range(E):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token]
        gate, up = xe @ w1[e].transpose(0, 1), xe @ w3[e].transpose(0, 1)
        o = act.torch_fn(gate, up) if act.gate_first else act.torch_fn(up, gate)
        o = o @ w2[e].transpose(0, 1)
        if b2 is not None:
            o = o + b2[e]
        y = y.index_add(0, token, o * topk_w[token, slot].to(x.dtype).unsqueeze(1))
    return y


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def gradients(fn, tensors, dy, dtype=None):
    """(y, grads by name) of fn(x, ids, topk_w, w1, w3, w2, b2) by torch.autograd, inputs cast to dtype."""
    x, ids, w, w1, w3, w2, b2 = tensors
    xl, wl, w1l, w3l, w2l, b2l = leaves((x, w, w1, w3, w2, b2), dtype)
    y = fn(xl, ids, wl, w1l, w3l, w2l, b2l)
    y.backward(dy.to(y.dtype))
    return y, {n: (t.grad if t is not None else None) for n, t in zip(GRADS, (xl, wl, w1l, w3l, w2l, b2l))}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref|: the error relative to the largest entry."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def norm_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ (Frobenius)."""
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_to_reference(name, got, ref, dtype, baseline=None):
    """fp32: within FP32_REL of the largest entry. fp16/bf16: norm-wise within FP16_FACTOR × the error of the
    plain implementation in the same dtype (`baseline`) against the same reference."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    if dtype == torch.float32:
        err = relative_error(got, ref)
        assert err <= FP32_REL, f"{name}: relative error {err:.2e} > {FP32_REL:.0e}"
    else:
        err, base = norm_error(got, ref), norm_error(baseline, ref)
        assert err <= FP16_FACTOR * base, f"{name}: relative error {err:.2e} > {FP16_FACTOR} × plain fp16's {base:.2e}"


def random_dy(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The CPU plan (the `cpu_path` fixture: TRITON_INTERPRET removed) or the Triton kernels on the interpreter."""
    if request.param == "cpu":
        request.getfixturevalue("cpu_path")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


# ---------------------------------------------------------------------------------------------------------
# The spec and the input checks
# ---------------------------------------------------------------------------------------------------------


def split_spec(**changes) -> MoESpec:
    base = dict(num_experts=4, top_k=2, hidden=32, intermediate=16, up_rows=32,
                activation=Activation("silu(x0)*x1", ((0, 1), (16, 1))), dtype="float32", out_dtype="float32", w3=True)
    return MoESpec(**{**base, **changes})


def test_spec_key_round_trip_and_unchanged_without_w3():
    spec = split_spec()
    assert MoESpec.from_key(spec.to_key()) == spec and '"w3":true' in spec.to_key()
    one_tensor = dataclasses.replace(spec, w3=False)
    assert "w3" not in one_tensor.to_key()  # keys (kernel caches, golden files) of existing specs unchanged
    assert "gate/up as w1, w3" in spec.describe() and "w1, w3" not in one_tensor.describe()
    swapped = split_spec(activation=Activation("x0*silu(x1)", ((16, 1), (0, 1))))
    assert MoESpec.from_key(swapped.to_key()) == swapped


@pytest.mark.parametrize("changes, words", [
    (dict(up_rows=48), "up_rows = 2·I"),  # the virtual [w1; w3] has 2·I rows
    (dict(activation=Activation("silu(x0)*x1", ((0, 2), (1, 2)))), "slices"),  # interleaved rows: one tensor
    (dict(activation=Activation("relu(x0)", ((0, 1),))), "slices"),  # non-GLU: nothing to split
    (dict(activation=Activation("silu(x0)*x1", ((0, 1), (8, 1)))), "slices"),  # halves overlap
    (dict(w1_bias=True), "biases on a split up-projection"),
])
def test_spec_rejects(changes, words):
    with pytest.raises(ValueError, match=words):
        split_spec(**changes)


def test_input_errors(cpu_path):
    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(CASES["T=1"], ACTS["silu(x0)*x1"], torch.float32)
    one_tensor = dataclasses.replace(spec, w3=False)
    with pytest.raises(InputError, match="w3: the spec holds gate and up as two tensors"):
        moe_call(spec, x, ids, w, w1, w2, None, b2)
    with pytest.raises(InputError, match="w3: given, but"):
        moe_call(one_tensor, x, ids, w, torch.cat([w1, w3], dim=1), w2, None, b2, w3=w3)
    with pytest.raises(InputError, match=r"w1: expected shape \(4, 32, 32\)"):  # [w1; w3] held in w1: w1 is [E, I, H]
        moe_call(spec, x, ids, w, torch.cat([w1, w3], dim=1), w2, None, b2, w3=w3)
    with pytest.raises(InputError, match=r"w3: expected shape \(4, 32, 32\)"):
        moe_call(spec, x, ids, w, w1, w2, None, b2, w3=w3[:, :16])
    with pytest.raises(InputError, match="w3: expected dtype torch.float32"):
        moe_call(spec, x, ids, w, w1, w2, None, b2, w3=w3.half())
    with pytest.raises(InputError, match="w3: expected device cpu"):  # (a meta input would send the op to its fake)
        check_layer_inputs(spec, x, ids, w, w1, w2, None, b2, w3.to("meta"))


def test_tuning_key_tells_the_split_layout_apart():
    # The split up GEMM is other code (SPLIT_W): tuned configs of the one-tensor layout must not be reused.
    spec = split_spec()
    one_tensor = dataclasses.replace(spec, w3=False)
    device = torch.device("cpu")
    assert tuning_key(spec, device, 64) != tuning_key(one_tensor, device, 64)


def test_expert_parallelism_refuses_w3():
    from moefuse.parallel import ExpertParallelError

    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(CASES["T=1"], ACTS["silu(x0)*x1"], torch.float32)
    with pytest.raises(ExpertParallelError, match="gate and up are two tensors"):
        torch.ops.moefuse.ep_moe(x, ids, w, w1, w2, None, b2, spec.to_key(), "none", "layer", False)


# ---------------------------------------------------------------------------------------------------------
# The ops: forward and every gradient against the reference, both paths
# ---------------------------------------------------------------------------------------------------------


def check_layer(spec, act, tensors, dtype, y_inference, op_fn):
    """y of the inference op and y, grads of the training op (op_fn) against the reference."""
    x = tensors[0]
    dy = random_dy((x.shape[0], spec.hidden), dtype)
    y, grads = gradients(op_fn, tensors, dy)
    y_ref, grads_ref = gradients(lambda *a: reference_moe(*a, act), tensors, dy, torch.float64)
    if dtype == torch.float16:
        y_base, grads_base = gradients(lambda *a: plain_fp16(*a, act), tensors, dy)
    else:
        y_base, grads_base = y, grads
    assert y.dtype == dtype and torch.equal(y_inference, y.detach())  # inference and training ops agree bitwise
    assert_close_to_reference("y", y, y_ref, dtype, y_base)
    for name in GRADS:
        if grads_ref[name] is None:
            assert grads[name] is None, name
            continue
        assert grads[name].dtype == tensors[GRADS.index(name) + (1 if name != "x" else 0)].dtype, name
        assert_close_to_reference(f"d{name}", grads[name], grads_ref[name], dtype, grads_base[name])


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_reference(name, dtype, act, path):
    spec, tensors = make_problem(CASES[name], ACTS[act], dtype)
    x, ids, w, w1, w3, w2, b2 = tensors
    before = dict(op.counters)
    y_inference = moe_call(spec, x, ids, w, w1, w2, None, b2, w3=w3)

    def fused(x, ids, w, w1, w3, w2, b2):
        return torch.ops.moefuse.moe_fwd(x, ids, w, w1, w2, None, b2, spec.to_key(), w3=w3)[0]

    check_layer(spec, ACTS[act], tensors, dtype, y_inference, fused)
    for counter in (path, f"fwd_train_{path}", f"bwd_{path}"):
        assert op.counters[counter] == before[counter] + 1, counter


def test_w3_gradient_flows_only_where_read(cpu_path):
    # An expert without tokens gets exact zero gradients in w1 and w3 (and they are two separate tensors).
    spec, tensors = make_problem(CASES["expert_without_tokens"], ACTS["silu(x0)*x1"], torch.float32)
    x, ids, w, w1, w3, w2, b2 = tensors
    _, grads = gradients(
        lambda x, ids, w, w1, w3, w2, b2: torch.ops.moefuse.moe_fwd(x, ids, w, w1, w2, None, b2, spec.to_key(),
                                                                    w3=w3)[0], tensors, random_dy((12, 32), x.dtype))
    assert torch.count_nonzero(grads["w1"][1]) == 0 and torch.count_nonzero(grads["w3"][1]) == 0
    assert torch.count_nonzero(grads["w3"][0]) > 0
    assert grads["w1"].data_ptr() != grads["w3"].data_ptr()


# ---------------------------------------------------------------------------------------------------------
# The kernels with interpreter-sized tiles: several M-, N- and K-tiles, per-tile and persistent + TMA grids
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_kernels_with_small_tiles(act, dtype, config):
    # 20 tokens on one expert: 2 M-tiles of 16; I = 40: 2 N-tiles of 32 (the second masked); H = 48: 2 K-steps.
    # The backward's dX runs SPLIT_K (A = dH's two K-halves against w1ᵀ and w3ᵀ) and dW1, dW3 the varlen-K GEMM
    # on dH's column halves.
    case = Case(T=20, K=2, E=3, H=48, I=40, b2=True)
    spec, tensors = make_problem(case, ACTS[act], dtype, seed=2)
    x, ids, w, w1, w3, w2, b2 = tensors
    activation = load_activation(spec.activation.expr, 2)
    cfg = CONFIGS[config]
    y, h = moe_forward(spec, x, ids, w, w1, w2, None, b2, activation=activation, config=cfg, save_h=True, w3=w3)
    dy = random_dy((case.T, case.H), dtype)
    dx, dw, dw1, dw2, db1, db2, dw3 = moe_backward(spec, dy, x, ids, w, w1, w2, None, b2, h, config=cfg, w3=w3)
    got = {"x": dx, "topk_w": dw, "w1": dw1, "w3": dw3, "w2": dw2, "b2": db2}
    assert db1 is None
    y_ref, grads_ref = gradients(lambda *a: reference_moe(*a, ACTS[act]), tensors, dy, torch.float64)
    if dtype == torch.float16:
        y_base, grads_base = gradients(lambda *a: plain_fp16(*a, ACTS[act]), tensors, dy)
    else:
        y_base, grads_base = y, got
    assert_close_to_reference("y", y, y_ref, dtype, y_base)
    for name in GRADS:
        assert_close_to_reference(f"d{name}", got[name], grads_ref[name], dtype, grads_base[name])


def test_split_tma_decision():
    # The host loads both tensors by TMA only when both allow it: a transposed w3 (no unit inner stride) keeps
    # the pointer loads for both, and the results agree bitwise with the contiguous TMA launch.
    case = Case(T=10, K=2, E=3, H=32, I=32)
    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(case, ACTS["silu(x0)*x1"], torch.float16)
    activation = load_activation(spec.activation.expr, 2)
    cfg = CONFIGS["persistent_tma"]
    y = moe_forward(spec, x, ids, w, w1, w2, None, b2, activation=activation, config=cfg, w3=w3)
    w3_t = w3.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride_k != 1
    y_t = moe_forward(spec, x, ids, w, w1, w2, None, b2, activation=activation, config=cfg, w3=w3_t)
    torch.testing.assert_close(y, y_t, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Flat pairs
# ---------------------------------------------------------------------------------------------------------


def reference_pairs(x, pairs: FlatPairs, w1, w3, w2, b2, act: Act):
    """The per-pair loop in float64: y[t] += weight · expert(x[t]) for every used pair."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for p in range(pairs.expert.shape[0]):
        e, t = int(pairs.expert[p]), int(pairs.token[p])
        if not 0 <= e < w1.shape[0]:
            continue
        gate, up = w1[e].double() @ x[t].double(), w3[e].double() @ x[t].double()
        a = F.silu(gate) * up
        o = w2[e].double() @ a + (b2[e].double() if b2 is not None else 0)
        y[t] += pairs.weight[p].double() * o
    return y


def variable_pairs(T: int, dtype: torch.dtype, gen: torch.Generator) -> FlatPairs:
    """Tokens with 0, 1 and 3 experts; expert 2 without pairs; a tail of 3 unused slots (expert −1) whose token
    and weight must leak nowhere."""
    experts = [[0, 3], [], [1], [0, 1, 3], [3]][:T]
    token = [t for t, es in enumerate(experts) for _ in es] + [1, 0, 4]
    expert = [e for es in experts for e in es] + [-1, -1, -1]
    offsets = [0]
    for es in experts:
        offsets.append(offsets[-1] + len(es))
    weight = torch.rand(len(token), generator=gen, dtype=torch.float64).to(torch.float32)
    return FlatPairs(torch.tensor(token, dtype=torch.int32), torch.tensor(expert, dtype=torch.int32), weight,
                     torch.tensor(offsets, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs_kind", ["exact_top_k", "variable_count"])
def test_flat_pairs(pairs_kind, dtype, path):
    act = ACTS["silu(x0)*x1"]
    case = Case(T=5, K=2, E=4, H=32, I=32, b2=True)
    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(case, act, dtype, seed=3)
    gen = torch.Generator().manual_seed(5)
    pairs = exact_pairs(ids, w) if pairs_kind == "exact_top_k" else variable_pairs(case.T, dtype, gen)
    dy = random_dy((case.T, case.H), dtype)
    before = dict(op.counters)

    def run(x, weight, w1, w3, w2, b2, reference=False, baseline=False):
        p = pairs._replace(weight=weight)
        if reference:
            return reference_pairs(x, p, w1, w3, w2, b2, act)
        if baseline:  # the plain fp16 loop on each used pair as a top-1 row, then each token's rows summed
            used = (p.expert >= 0).nonzero().squeeze(1)
            token = p.token[used].long()
            rows = plain_fp16(x[token], p.expert[used].unsqueeze(1), weight[used].unsqueeze(1), w1, w3, w2, b2, act)
            return x.new_zeros(x.shape).index_add(0, token, rows)
        return fused_moe_pairs(spec, x, p, w1, w2, None, b2, w3=w3)

    def grads_of(dtype_=None, **kw):
        ls = leaves((x, pairs.weight, w1, w3, w2, b2), dtype_)
        y = run(*ls, **kw)
        y.backward(dy.to(y.dtype))
        return y, dict(zip(("x", "topk_w", "w1", "w3", "w2", "b2"), (t.grad for t in ls)))

    y, grads = grads_of()
    y_ref, grads_ref = grads_of(torch.float64, reference=True)
    y_base, grads_base = grads_of(baseline=True) if dtype == torch.float16 else (y, grads)
    assert_close_to_reference("y", y, y_ref, dtype, y_base)
    for name in GRADS:
        assert_close_to_reference(f"d{name}", grads[name], grads_ref[name], dtype, grads_base[name])
    if pairs_kind == "variable_count":  # unused slots: no gradient
        assert torch.count_nonzero(grads["topk_w"][-3:]) == 0
    for counter in (f"pairs_fwd_train_{path}", f"pairs_bwd_{path}"):
        assert op.counters[counter] == before[counter] + 1, counter


# ---------------------------------------------------------------------------------------------------------
# Registration: fakes, autograd, AOT dispatch; w3 beside a shared expert
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cpu_path")
def test_opcheck():
    # Schema, fake tensors (w1 and dw1 [E, I, H], dw3 the last output), the autograd registration and AOT dispatch
    # with dynamic shapes, for the [T, K] ops and the flat-pairs ops with w3 as their last argument.
    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(CASES["H_I_not_multiples_of_tiles_b2"], ACTS["x0*silu(x1)"],
                                                     torch.float32)
    key = spec.to_key()
    grad_args = [t.requires_grad_() for t in (x.clone(), w.clone(), w1.clone(), w2.clone(), b2.clone(), w3.clone())]
    xg, wg, w1g, w2g, b2g, w3g = grad_args
    torch.library.opcheck(torch.ops.moefuse.moe.default, (x, ids, w, w1, w2, None, b2, key),
                          {"w3": w3})
    torch.library.opcheck(torch.ops.moefuse.moe_fwd.default, (xg, ids, wg, w1g, w2g, None, b2g, key), {"w3": w3g})
    y, h = torch.ops.moefuse.moe_fwd(x, ids, w, w1, w2, None, b2, key, w3=w3)
    torch.library.opcheck(torch.ops.moefuse.moe_bwd.default, (torch.randn_like(y), x, ids, w, w1, w2, None, b2, h, key),
                          {"w3": w3})
    pairs = exact_pairs(ids, w)
    pair_args = (x, pairs.token, pairs.expert, pairs.weight, pairs.token_offsets, w1, w2, None, b2, key, w3)
    torch.library.opcheck(torch.ops.moefuse.moe_pairs.default, pair_args)
    grad_pairs = (xg, pairs.token, pairs.expert, pairs.weight.clone().requires_grad_(), pairs.token_offsets, w1g, w2g,
                  None, b2g, key, w3g)
    torch.library.opcheck(torch.ops.moefuse.moe_pairs_fwd.default, grad_pairs)
    y, h = torch.ops.moefuse.moe_pairs_fwd(*pair_args)
    torch.library.opcheck(torch.ops.moefuse.moe_pairs_bwd.default,
                          (torch.randn_like(y), *pair_args[:-2], h, key, w3))


def test_w3_beside_a_shared_expert(cpu_path):
    # moe_bwd's outputs with both: the six routed gradients, the shared expert's five, then dw3. The shared
    # expert does not read w3, so dw3 and dw1 are those of the layer without it, and y differs by its output.
    from moefuse.runtime.shared import shared_forward
    from moefuse.spec import SharedExpert

    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(CASES["K=E"], ACTS["silu(x0)*x1"], torch.float32)
    gen = torch.Generator().manual_seed(7)
    Is = 16
    shared = SharedExpert(Is, 2 * Is, Activation("silu(x0)*x1", ((0, 1), (Is, 1))))
    sw1, sw3 = torch.randn(Is, 32, generator=gen) * 0.2, torch.randn(Is, 32, generator=gen) * 0.2
    sw2 = torch.randn(32, Is, generator=gen) * 0.2
    with_shared = dataclasses.replace(spec, shared=shared)
    dy = random_dy((x.shape[0], 32), torch.float32)

    def run(s, **shared_args):
        w1l, w3l = w1.clone().requires_grad_(), w3.clone().requires_grad_()
        y, _ = torch.ops.moefuse.moe_fwd(x, ids, w, w1l, w2, None, b2, s.to_key(), w3=w3l, **shared_args)
        y.backward(dy)
        return y.detach(), w1l.grad, w3l.grad

    y, dw1, dw3 = run(spec)
    y_s, dw1_s, dw3_s = run(with_shared, shared_w1=sw1, shared_w2=sw2, shared_w3=sw3)
    torch.testing.assert_close(y_s, y + shared_forward(shared, x, sw1, sw3, sw2, None), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw1_s, dw1, rtol=0, atol=0)
    torch.testing.assert_close(dw3_s, dw3, rtol=0, atol=0)


def test_weights_are_never_concatenated(path, monkeypatch):
    # No per-call [w1; w3]: no torch.cat / torch.stack / clone ever takes w1 or w3 (or a view of them), forward or
    # backward. The kernels read each tensor where it lies; the CPU plan runs one GEMM per tensor into H's halves.
    # (A TorchDispatchMode would not do: it sees the custom op, not the torch calls inside its implementation.)
    spec, (x, ids, w, w1, w3, w2, b2) = make_problem(CASES["K=E"], ACTS["silu(x0)*x1"], torch.float16)
    w1, w3 = w1.requires_grad_(), w3.requires_grad_()
    storages = {w1.untyped_storage().data_ptr(), w3.untyped_storage().data_ptr()}
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in storages for a in flat):
                seen.append(name)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("cat", "stack", "concat", "concatenate"):
        monkeypatch.setattr(torch, name, spy(name, getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "clone", spy("clone", torch.Tensor.clone))
    y = torch.ops.moefuse.moe_fwd(x, ids, w, w1, w2, None, b2, spec.to_key(), w3=w3)[0]
    torch.cat([w1[:1], w3[:1]])  # the spy works: this one is seen
    assert seen == ["cat"]
    y.backward(torch.ones_like(y))
    assert seen == ["cat"] and w1.grad is not None and w3.grad is not None


# ---------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (wgmma, TMA with two descriptors on sm_90), fp16 and bf16
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels and TMA")
@pytest.mark.parametrize("schedule", ["per_tile", "persistent_tma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_split_on_cuda(dtype, schedule, monkeypatch):
    # Default tiles (BLOCK_M=64: 4 M-tiles on the busiest experts), forward with either schedule, the default
    # backward; bounded like the fp16 tests above, by a plain torch implementation in the same dtype on the GPU.
    from moefuse.kernels.grouped_gemm import GemmConfig

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = Case(T=256, K=2, E=8, H=256, I=128, b2=True)
    act = ACTS["silu(x0)*x1"]
    spec, cpu_tensors = make_problem(case, act, dtype)
    tensors = [t.cuda() if t is not None else None for t in cpu_tensors]
    x, ids, w, w1, w3, w2, b2 = tensors
    config = GemmConfig.default(dtype)
    if schedule == "persistent_tma":
        config = dataclasses.replace(config, persistent=True, tma=True)
    activation = load_activation(spec.activation.expr, 2)
    y, h = moe_forward(spec, x, ids, w, w1, w2, None, b2, activation=activation, config=config, save_h=True, w3=w3)
    dy = random_dy((case.T, case.H), dtype).cuda()
    dx, dw, dw1, dw2, _, db2, dw3 = moe_backward(spec, dy, x, ids, w, w1, w2, None, b2, h, w3=w3)
    got = {"x": dx, "topk_w": dw, "w1": dw1, "w3": dw3, "w2": dw2, "b2": db2}
    y_ref, grads_ref = gradients(lambda *a: reference_moe(*a, act), cpu_tensors, dy.cpu(), torch.float64)
    y_base, grads_base = gradients(lambda *a: plain_fp16(*a, act), tensors, dy)
    assert_close_to_reference("y", y.cpu(), y_ref, dtype, y_base.cpu())
    for name in GRADS:
        assert_close_to_reference(f"d{name}", got[name].cpu(), grads_ref[name], dtype, grads_base[name].cpu())
