"""The backward kernels (moefuse.kernels.backward) and the forward's saved H, under the Triton interpreter,
against float64 torch autograd of a deliberately naive per-token loop."""
import os

# Before triton or moefuse's kernels are imported: `triton.jit` picks the interpreter when a kernel is defined.
os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_kernels import SMALL, make_ids  # noqa: E402

from moefuse.kernels.backward import BackwardConfig, moe_backward  # noqa: E402
from moefuse.kernels.codegen import load_activation  # noqa: E402
from moefuse.kernels.grouped_gemm import GemmConfig  # noqa: E402
from moefuse.kernels.moe import moe_forward  # noqa: E402
from moefuse.kernels.routing import routing_plan_reference  # noqa: E402
from moefuse.spec import Activation, MoESpec  # noqa: E402
from moefuse.testing import UNIT_ROUNDOFF, assert_parity  # noqa: E402

# The interpreter evaluates with numpy, which warns where a branch that tl.where then discards divides 0/0 (the
# small-|x| branch of gelu-tanh's expm1 helper); the results are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

GRADS = ("dx", "dtopk_w", "dw1", "dw2", "db1", "db2")

# Interpreter-sized tiles that still split the small shapes below: the activation GEMM as the forward's tests
# (several M-tiles per expert, NT = 2 partial sums when I = 40); dW with 16-row steps, so a 40-row segment takes
# two full steps and a partial one; dX with 32-row tiles (the forward's tests cover 16 on the same kernel).
TILES = BackwardConfig(
    activation=SMALL,
    weight=GemmConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=1),
    dx=GemmConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=1),
)

# fp32: how far each gradient may be from the float64 reference, and why. Errors are measured relative to the
# gradient's scale (see `assert_grads_close`): |err| <= atol·rms(ref) + rtol·|ref|. fp16 and bf16: derived, not
# tabled — each gradient's error within a small multiple of eager PyTorch's (the same loop and autograd in the
# dtype), both against the float64 reference (`moefuse.testing.assert_parity`).
TOLERANCES = {
    # fp32 everywhere (H, dA', dH, A' and the accumulators): only summation order differs from float64, over
    # <= 80-term dot products and <= 40-row segment sums. Measured worst ratio to this bound: 0.14 (dw1),
    # every case × 4 seeds.
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
# bf16 through the interpreter's tl.dot by the shim conftest installs (moefuse.testing.install_interpreter_bf16_dot)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------
# Activations and layouts: the expression the kernels generate code from, and an independent torch spelling
# ---------------------------------------------------------------------------------------------------------


def _gpt_oss(gate, up):
    gate = gate.clamp(max=7.0)
    return (up.clamp(-7.0, 7.0) + 1) * gate * torch.sigmoid(1.702 * gate)


@dataclass(frozen=True)
class Act:
    expr: str
    torch_fn: object
    kinks: tuple[tuple[float, ...], ...]  # per input, where the derivative jumps (avoided by the data)


ACTS = {
    "swiglu": Act("silu(x0)*x1", lambda g, u: F.silu(g) * u, ((), ())),
    "gpt_oss": Act("(clamp(x1, -7, 7) + 1)*clamp(x0, max=7)*sigmoid(1.702*clamp(x0, max=7))", _gpt_oss,
                   ((7.0,), (-7.0, 7.0))),
    "gelu_tanh": Act("gelu(x0, approximate='tanh')", lambda x: F.gelu(x, approximate="tanh"), ((),)),
    "relu": Act("relu(x0)", torch.relu, ((0.0,),)),
}


def slices_of(layout: str, inter: int) -> tuple[tuple[int, int], ...]:
    return {
        "gate_up": ((0, 1), (inter, 1)),  # Mixtral/Qwen: w1 = [gate; up]
        "up_gate": ((inter, 1), (0, 1)),  # [up; gate]
        "interleaved": ((0, 2), (1, 2)),  # GPT-OSS
        "plain": ((0, 1),),  # non-GLU
    }[layout]


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
    act: str = "swiglu"
    layout: str = "gate_up"
    bias: bool = False
    transposed: bool = False  # weights stored [E, in, out], passed as transposed views
    ids: str = "random"  # as test_kernels.make_ids: random | skip_expert_1 | all_on_0 | every_expert | dropped
    scale: float = 1.0  # std of x: 5 spreads the pre-activations over GPT-OSS's clamps at ±7
    extra_rows: int = 0  # up-projection rows no activation input reads: their gradient is 0
    seed: int = 0


CASES = {
    "T=1": Case(T=1, K=2, E=4, H=32, I=32),  # one token: every expert has 0 or 1 rows
    "expert_without_tokens": Case(T=24, K=2, E=6, H=32, I=32, ids="skip_expert_1"),  # dW[1] = 0, written anyway
    "all_tokens_on_one_expert": Case(T=40, K=1, E=4, H=32, I=32, ids="all_on_0"),  # 40-row segment: 2 K-steps
    "T_not_multiple_of_BLOCK_M": Case(T=37, K=2, E=3, H=32, I=32),  # partial tiles; partial last K-step of dW
    "K=E": Case(T=12, K=4, E=4, H=32, I=32, ids="every_expert"),  # dx sums 4 pairs, dtopk_w has no zero
    "glu_up_gate": Case(T=20, K=2, E=4, H=32, I=32, layout="up_gate"),  # dH columns OFF0 = I
    "glu_interleaved": Case(T=20, K=2, E=4, H=32, I=32, layout="interleaved"),  # dH columns step 2
    # one input, a kink at 0 (seed 1: seed 0 puts a bf16 input 7e-5 from it)
    "non_glu_relu": Case(T=20, K=2, E=4, H=32, I=32, act="relu", layout="plain", seed=1),
    "biases": Case(T=20, K=2, E=4, H=32, I=32, bias=True),  # db1, db2, and ⟨dy, b2⟩ in dtopk_w
    "transposed_weights": Case(T=20, K=2, E=4, H=32, I=32, transposed=True),  # w1ᵀ / w2ᵀ strides swapped
    "H_I_not_multiples_of_tiles": Case(T=21, K=3, E=5, H=48, I=40, bias=True),  # masked tails; NT = 2, partial
    "dropped_ids": Case(T=20, K=2, E=4, H=32, I=32, ids="dropped"),  # -1 and E: zero dtopk_w, no contribution
    "gpt_oss_clamp": Case(T=20, K=2, E=4, H=32, I=32, act="gpt_oss", layout="interleaved", bias=True, scale=5.0),
    "gelu_tanh": Case(T=20, K=2, E=4, H=32, I=32, act="gelu_tanh", layout="plain", bias=True),
    "unread_up_rows": Case(T=20, K=2, E=4, H=32, I=32, act="relu", layout="plain", extra_rows=16),  # dw1 rows = 0
}


def make_problem(case: Case, dtype: torch.dtype, seed: int | None = None):
    seed = case.seed if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    act, slices = ACTS[case.act], slices_of(case.layout, case.I)
    T, K, E, H, I = case.T, case.K, case.E, case.H, case.I  # noqa: E741
    up_rows = (2 * I if len(slices) == 2 else I) + case.extra_rows

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(T, H, scale=case.scale)
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
    dy = randn(T, H)
    spec = MoESpec(
        num_experts=E, top_k=K, hidden=H, intermediate=I, up_rows=up_rows,
        activation=Activation(act.expr, slices), dtype=str(dtype).removeprefix("torch."),
        out_dtype=str(dtype).removeprefix("torch."), w1_bias=case.bias, w2_bias=case.bias,
    )
    return spec, act, dy, (x, topk_ids, topk_w, w1, w2, b1, b2)


# ---------------------------------------------------------------------------------------------------------
# Reference: a naive loop over tokens and their experts in float64, differentiated by torch.autograd
# ---------------------------------------------------------------------------------------------------------


def reference(spec: MoESpec, act: Act, dy, x, topk_ids, topk_w, w1, w2, b1, b2, dtype=torch.float64):
    """(grads dict in GRADS order, pre-activations [T, K, N1] float64 (NaN for dropped pairs)); with `dtype` the
    same loop and autograd in that dtype — eager PyTorch's gradients (the eager side of
    `moefuse.testing.assert_parity`)."""
    T, K = topk_ids.shape
    E, I = spec.num_experts, spec.intermediate  # noqa: E741
    inputs = {"dx": x, "dtopk_w": topk_w, "dw1": w1, "dw2": w2, "db1": b1, "db2": b2}
    leaves = {name: t.detach().to(dtype).requires_grad_() for name, t in inputs.items() if t is not None}
    x_, s_, w1_, w2_ = leaves["dx"], leaves["dtopk_w"], leaves["dw1"], leaves["dw2"]
    cols = torch.arange(I)
    pre = torch.full((T, K, spec.up_rows), float("nan"), dtype=torch.float64)
    rows = []
    for t in range(T):
        y_t = torch.zeros(x.shape[1], dtype=dtype)
        for k in range(K):
            e = int(topk_ids[t, k])
            if not 0 <= e < E:  # dropped id: no expert, no contribution, no gradient
                continue
            h = w1_[e] @ x_[t]
            if b1 is not None:
                h = h + leaves["db1"][e]
            pre[t, k] = h.detach()
            a = act.torch_fn(*(h[off + step * cols] for off, step in spec.activation.slices))
            o = w2_[e] @ a
            if b2 is not None:
                o = o + leaves["db2"][e]
            y_t = y_t + s_[t, k] * o
        rows.append(y_t)
    y = torch.stack(rows)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(dtype), materialize_grads=True)
    out = dict.fromkeys(GRADS)
    out.update(zip(leaves, grads))
    return out, pre


def assert_away_from_kinks(spec: MoESpec, act: Act, pre: torch.Tensor, scale: float,
                           dtype: torch.dtype = torch.float16) -> None:
    """The data keeps every activation input away from a kink c, where rounding H could pick the other one-sided
    derivative: by u·|c| (the dtype's rounding of H — fp16: 0.0034 at ±7, where a value lands on 7.0 itself at
    0.002; bf16: 0.027) plus 1e-4·scale (fp32 summation order, far more than needed). A check of the seed, not
    of the kernels."""
    u = max(UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float16])
    cols = torch.arange(spec.intermediate)
    for (off, step), kinks in zip(spec.activation.slices, act.kinks):
        values = pre[..., off + step * cols]
        values = values[~values.isnan()]
        for kink in kinks:
            distance = (values - kink).abs().min().item()
            margin = u * abs(kink) + 1e-4 * scale
            assert distance > margin, f"the seed puts an input {distance:.1e} from the kink at {kink}"
            # and both one-sided derivatives are tested
            assert (values < kink).sum() >= 10 and (values > kink).sum() >= 10, f"kink at {kink}: one side untested"


def assert_grads_close(got: dict, want: dict, dtype: torch.dtype, eager: dict | None = None) -> None:
    """Every gradient against the float64 reference `want`: fp32 within TOLERANCES; fp16 / bf16 within
    `assert_parity`'s bound from `eager`'s error (the reference computed in `dtype`)."""
    for name in GRADS:
        if want[name] is None:
            assert got[name] is None, name
            continue
        if dtype != torch.float32:
            assert eager is not None, "fp16 / bf16 gradients are checked against eager's error: pass eager"
            assert_parity(got[name], eager[name], want[name], dtype, what=name)
            continue
        tol = TOLERANCES[dtype]
        g, w = got[name].double(), want[name]
        assert got[name].shape == w.shape, (name, got[name].shape, w.shape)
        scale = w.pow(2).mean().sqrt().item() if w.numel() else 0.0
        bound = tol["atol"] * max(scale, 1e-30) + tol["rtol"] * w.abs()
        err = (g - w).abs()
        worst = (err / bound).max().item() if w.numel() else 0.0
        assert worst <= 1.0, f"{name}: error {worst:.2f}× the tolerance (max |err| {err.max().item():.2e}, " \
                             f"rms(ref) {scale:.2e})"


def run_both(case: Case, dtype: torch.dtype, config=TILES):
    spec, act, dy, args = make_problem(case, dtype)
    forward_config = config.activation if config is not None else None
    y, h = moe_forward(spec, *args, activation=load_activation(act.expr, spec.activation.num_inputs),
                       config=forward_config, save_h=True)
    grads = moe_backward(spec, dy, *args, h, config=config)
    return spec, act, dy, args, h, dict(zip(GRADS, grads))


# ---------------------------------------------------------------------------------------------------------
# Every gradient against the reference
# ---------------------------------------------------------------------------------------------------------


# GPT-OSS's clamp at ±7 in bf16: bf16's spacing there is 1/32, so any scale-5 draw of these 1,280 inputs puts
# some within rounding of 7 — where rounding H picks the other one-sided derivative, in eager as in the kernels
# (no seed in 1…80 avoids it). Its kinks are tested in fp32 and fp16; its bf16 arithmetic away from them in
# test_bf16_clamp_away_from_the_kinks.
BF16_KINKED = {"gpt_oss_clamp"}


@pytest.mark.parametrize("name,dtype", [(name, dtype) for dtype in DTYPES for name in CASES
                                        if not (dtype == torch.bfloat16 and name in BF16_KINKED)], ids=str)
def test_backward_matches_autograd(name, dtype):
    case = CASES[name]
    spec, act, dy, args, h, got = run_both(case, dtype)
    want, pre = reference(spec, act, dy, *args)
    eager = reference(spec, act, dy, *args, dtype=dtype)[0] if dtype != torch.float32 else None
    assert_away_from_kinks(spec, act, pre, case.scale, dtype)
    x, ids, w, w1, w2, b1, b2 = args
    for name_, like in (("dx", x), ("dtopk_w", w), ("dw1", w1), ("dw2", w2), ("db1", b1), ("db2", b2)):
        if like is not None:
            assert got[name_].dtype == like.dtype, name_
    for name_ in ("dw1", "dw2"):
        assert got[name_].is_contiguous(), name_
    assert_grads_close(got, want, dtype, eager)


def test_bf16_clamp_away_from_the_kinks():
    """GPT-OSS's clamped activation in bf16 at scale 1, where no input comes near ±7: every gradient within
    eager's bound (the clamp's branches are exercised by the fp32 / fp16 gpt_oss_clamp case)."""
    import dataclasses

    case = dataclasses.replace(CASES["gpt_oss_clamp"], scale=1.0)
    spec, act, dy, args, h, got = run_both(case, torch.bfloat16)
    want, pre = reference(spec, act, dy, *args)
    assert pre[~pre.isnan()].abs().max() < 6.5  # far from the kinks
    assert_grads_close(got, want, torch.bfloat16, reference(spec, act, dy, *args, dtype=torch.bfloat16)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_config(dtype):
    # The GPU default tiles (BLOCK_M = BLOCK_N = 64 > every expert's rows and > I): one partial tile per expert,
    # a single N-tile (NT = 1) of dS, one K-step per segment in dW.
    case = Case(T=30, K=2, E=4, H=64, I=64, layout="interleaved", bias=True)
    spec, act, dy, args, h, got = run_both(case, dtype, config=None)
    want, _ = reference(spec, act, dy, *args)
    eager = reference(spec, act, dy, *args, dtype=dtype)[0] if dtype != torch.float32 else None
    assert_grads_close(got, want, dtype, eager)


def test_mixed_dtypes():
    # dy in fp32 for an fp16 layer (an fp32 output, as with out_dtype=float32), bf16 routing weights: dy is cast
    # to fp16 (what autograd does at the layer's cast), dtopk_w comes back in bf16 (2**-9 rounding, within
    # the fp16 tolerance).
    spec, act, dy, (x, ids, w, w1, w2, b1, b2) = make_problem(CASES["biases"], torch.float16)
    dy, w = dy.float() + 1e-3, w.bfloat16()
    y, h = moe_forward(spec, x, ids, w, w1, w2, b1, b2, activation=load_activation(act.expr, 2), config=SMALL,
                       save_h=True)
    got = dict(zip(GRADS, moe_backward(spec, dy, x, ids, w, w1, w2, b1, b2, h, config=TILES)))
    assert got["dtopk_w"].dtype == torch.bfloat16 and got["dx"].dtype == torch.float16
    want, _ = reference(spec, act, dy, x, ids, w, w1, w2, b1, b2)
    eager, _ = reference(spec, act, dy.half(), x, ids, w.half(), w1, w2, b1, b2, dtype=torch.float16)
    eager["dtopk_w"] = eager["dtopk_w"].bfloat16()  # the kernels' dtopk_w is bf16 like w: so is eager's
    assert_grads_close(got, want, torch.float16, eager)


def test_T_zero():
    # No pairs: no launch; the weight gradients are zeros (not garbage), dx and dtopk_w empty.
    spec, act, dy, args = make_problem(Case(T=0, K=2, E=4, H=32, I=32, bias=True), torch.float32)
    y, h = moe_forward(spec, *args, activation=load_activation(act.expr, 2), config=SMALL, save_h=True)
    assert y.shape == (0, 32) and h.shape == (0, 64)
    dx, dw, dw1, dw2, db1, db2, _ = moe_backward(spec, dy, *args, h, config=TILES)
    assert dx.shape == (0, 32) and dw.shape == (0, 2)
    for grad, shape in ((dw1, (4, 64, 32)), (dw2, (4, 32, 32)), (db1, (4, 64)), (db2, (4, 32))):
        assert grad.shape == shape and not grad.any()


# ---------------------------------------------------------------------------------------------------------
# The forward's saved H
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["biases", "glu_interleaved", "glu_up_gate", "dropped_ids", "unread_up_rows"])
def test_save_h_is_the_sorted_pre_activation(name, dtype):
    # h[r] is the up-projection (b1 included) of sorted row r's pair, at every row an activation input reads;
    # y is bit-for-bit the y of a forward without save_h (STORE_H only adds stores).
    case = CASES[name]
    spec, act, dy, args = make_problem(case, dtype)
    activation = load_activation(act.expr, spec.activation.num_inputs)
    y, h = moe_forward(spec, *args, activation=activation, config=SMALL, save_h=True)
    assert torch.equal(y, moe_forward(spec, *args, activation=activation, config=SMALL))
    assert h.shape == (case.T * case.K, spec.up_rows) and h.dtype == dtype
    x, ids, w, w1, w2, b1, b2 = args
    _, pre = reference(spec, act, dy, *args)
    plan = routing_plan_reference(ids, case.E)
    kept = int(plan.offsets[-1])
    expected = pre.reshape(-1, spec.up_rows)[plan.sorted_pairs[:kept].long()]
    read = torch.tensor(sorted({off + step * n for off, step in spec.activation.slices for n in range(case.I)}))
    # H is the forward's fp32 accumulator rounded once to the dtype: within fp32 summation order of the
    # reference (the fp32 tolerance), plus that one rounding, u·|h|, in fp16 / bf16 (derived, no eager needed).
    u = UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 0.0
    torch.testing.assert_close(h[:kept, read].double(), expected[:, read], atol=1e-5, rtol=1e-5 + u)


# ---------------------------------------------------------------------------------------------------------
# Determinism, no host sync, errors
# ---------------------------------------------------------------------------------------------------------


def test_deterministic():
    # No atomics, fixed summation orders: two runs agree bit for bit.
    first = run_both(CASES["biases"], torch.float32)[-1]
    second = run_both(CASES["biases"], torch.float32)[-1]
    for name in GRADS:
        assert torch.equal(first[name], second[name]), name


def test_no_host_sync(monkeypatch):
    # The host path must not read device values back: every way it could is made to raise.
    spec, act, dy, args = make_problem(CASES["biases"], torch.float32)
    y, h = moe_forward(spec, *args, activation=load_activation(act.expr, 2), config=SMALL, save_h=True)

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in the moefuse backward")

    for name in ("item", "tolist", "nonzero", "unique", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    monkeypatch.setattr(torch, "unique", sync)
    grads = moe_backward(spec, dy, *args, h, config=TILES)
    monkeypatch.undo()
    want, _ = reference(spec, act, dy, *args)
    assert_grads_close(dict(zip(GRADS, grads)), want, torch.float32)


def test_errors():
    spec, act, dy, args = make_problem(CASES["biases"], torch.float32)
    h = torch.zeros(40, 64)
    with pytest.raises(ValueError, match=r"h: expected shape \(40, 64\), got \(40, 32\)"):
        moe_backward(spec, dy, *args, h[:, :32])
    with pytest.raises(ValueError, match=r"dy: expected shape \(20, 32\), got \(20, 16\)"):
        moe_backward(spec, dy[:, :16], *args, h)
    with pytest.raises(ValueError, match=r"h: expected dtype torch.float32, got torch.float16"):
        moe_backward(spec, dy, *args, h.half())
    # Two inputs reading one row (x0*x0 spelled as a GLU) would need dH = s·dA'·(d0 + d1) at that row.
    overlapping = MoESpec(**{**spec.__dict__, "activation": Activation("x0*x1", ((0, 1), (0, 1)))})
    with pytest.raises(ValueError, match=r"both read up-projection rows \[0, 1, 2, 3\]"):
        moe_backward(overlapping, dy, *args, h)
