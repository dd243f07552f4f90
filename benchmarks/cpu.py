"""CPU benchmark: one Qwen3-MoE sparse MoE block (random weights) in fp32 and bf16 through transformers' experts
paths and moefuse, against a measured roofline floor, and one training step of a tiny Qwen3-MoE causal LM; every
number from the same run.

Paths, per shape and dtype:
  transformers eager loop           `_experts_implementation="eager"`: the per-expert Python loop
  transformers grouped_mm           `"grouped_mm"` in eager: one `torch.nn.functional.grouped_mm` per projection
  transformers grouped_mm+inductor  the same block under torch.compile(backend="inductor"); in fp32 dynamo routes
                                    the GEMMs to `transformers::grouped_mm_fallback` (a per-expert torch.mm loop)
  moefuse (inner=inductor)          torch.compile(block, backend=moefuse.Backend({"inner": "inductor"})); the run
                                    fails unless the layer was lowered and each call runs `moefuse::moe` once
  moefuse op alone                  `moefuse::moe` on the block's own routing: the fused op without the router
                                    and the rest of the graph (on the CPU: the generated C++ kernels)
  moefuse torch plan                the same call with MOEFUSE_CPU_KERNELS=0 set around it: moefuse's older torch
                                    plan, so the two rows show what the generated kernels gained

Weights and x are drawn in fp32 (the same draw for both dtypes) and rounded to the dtype. Checks, before any
timing: fp32 — every path against the eager loop (rtol 1e-4, atol 1e-5). bf16 — every path against the fp32 eager
loop on the same bf16-rounded weights and input, with the routing the bf16 router chose (a bf16 near-tie flips
a token's experts against fp32 logits, an O(1) change no rounding tolerance should absorb); a path's max error
may be at most 4× the bf16 eager loop's own max error against that reference, plus 1e-6.

Floor, per (shape, dtype): max(compute, memory). compute = expert-GEMM FLOPs (2·T·K·H·(N1 + I)) ÷ the rate of
dense torch.mm calls in that dtype with exactly those FLOPs and M/N/K ([T·K, H]·[H, N1] and [T·K, I]·[I, H], the
experts' work with no routing); memory = bytes of the expert weights the routing touches (distinct experts hit ×
(N1·H + H·I) × the dtype's itemsize) ÷ the read bandwidth of summing a 512 MiB tensor. Both rates are timed in the
same rounds as the paths. "× best transformers" is against the fastest transformers path of the same shape and
dtype.
Caveat for the memory-bound shapes: one block is re-read every call, and a last-level cache as large as this
VM's (sums of ≤ 96 MiB ran at 34–37 GB/s, ≥ 256 MiB at 15–16 GB/s) keeps part of its 48–192 MiB of expert
weights, so a path can come in under the DRAM floor. `--cold-cache` reads another 512 MiB tensor (untimed)
before every timed call, so weights come from DRAM as they would in a deep model.

Training step: a Qwen3-MoE causal LM built from TRAIN_CONFIG (no download; 2 layers, H=256, E=16, K=4, I=128,
experts on grouped_mm), one batch of 4×128 token ids, fp32 and bf16; a step is zero_grad(set_to_none), forward,
next-token loss, backward. Paths: transformers' grouped_mm under eager autograd, and torch.compile(model,
backend=moefuse.Backend({"inner": "eager"})) — the run fails unless moefuse lowered every MoE layer and every
step runs `moefuse::moe_fwd` and `moefuse::moe_bwd` once per layer (the op's counters). Gradients are checked per
parameter (‖g − g_ref‖ / ‖g_ref‖): fp32 against transformers' (≤ 1e-4); bf16 against the fp32 model on the same
rounded weights, moefuse's error at most 4× transformers' bf16 error in the same parameter, plus 1e-6.

Timing: every path is compiled, checked and warmed up first; then the paths (and the two floor probes) run
interleaved, one call each per round in a rotating order, so that a noisy neighbour slows all of them alike;
medians over the rounds. The training steps of both dtypes are interleaved the same way. Compare ratios within
one run, not times across runs.

    python benchmarks/cpu.py [--quick] [--json results.json] [--seed 0] [--cold-cache] [--wait-quiet S]
                             [--threads N] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moefuse
from _env import cpu_model  # benchmarks/_env.py: the scripts run as `python benchmarks/NAME.py`
from moefuse.runtime import op as moefuse_op

TARGET_X_FLOOR = 1.15  # the project's goal for moefuse: within 15 % of the floor at every shape
BANDWIDTH_BYTES = 512 << 20  # 5× what this VM's LLC holds, so the sum streams from DRAM


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # T
    experts: int  # E
    top_k: int  # K
    hidden: int  # H
    intermediate: int  # I (moe_intermediate_size)

    @property
    def up_rows(self) -> int:  # N1: SwiGLU's [gate; up]
        return 2 * self.intermediate

    @property
    def flops(self) -> int:
        return 2 * self.tokens * self.top_k * self.hidden * (self.up_rows + self.intermediate)

    @property
    def expert_params(self) -> int:  # weights of one expert
        return self.up_rows * self.hidden + self.hidden * self.intermediate

    def expert_bytes(self, itemsize: int) -> int:
        return self.expert_params * itemsize

    @property
    def short(self) -> str:
        return self.name if self.name == f"T={self.tokens}" else f"{self.name} T={self.tokens}"

    def label(self) -> str:
        return f"{self.short} E={self.experts} K={self.top_k} H={self.hidden} I={self.intermediate}"


SHAPES = (
    Shape("decode", 8, 64, 8, 1024, 256),
    Shape("T=64", 64, 64, 8, 1024, 256),  # the decode experts, 8× the tokens
    Shape("prefill", 2048, 16, 2, 1024, 512),
)

LOOP, GROUPED, GROUPED_INDUCTOR, MOEFUSE, MOEFUSE_OP, MOEFUSE_TORCH = (
    "transformers eager loop", "transformers grouped_mm", "transformers grouped_mm+inductor",
    "moefuse (inner=inductor)", "moefuse op alone", "moefuse torch plan",
)
TRANSFORMERS_PATHS = (LOOP, GROUPED, GROUPED_INDUCTOR)
DENSE_MM, READ_512M = "floor probe: dense mm", "floor probe: read 512 MiB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
KERNELS_ENV = "MOEFUSE_CPU_KERNELS"  # "0": moefuse's CPU path runs its torch plan instead of the generated C++
# bf16 checks: a path's max error against the fp32 reference may be this many times the bf16 eager loop's own,
# plus BF16_ATOL (a floor for the case where the loop happens to be exact).
BF16_ERR_FACTOR, BF16_ATOL = 4.0, 1e-6

# The training section: a tiny Qwen3-MoE causal LM, built from this config (no download), one batch of
# TRAIN_BATCH token ids.
TRAIN_CONFIG = dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                    num_hidden_layers=2, vocab_size=512, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
TRAIN_BATCH = (4, 128)
TRAIN_EAGER, TRAIN_MOEFUSE = "transformers grouped_mm (eager autograd)", "moefuse (inner=eager)"


@dataclass(frozen=True)
class Budget:
    """How long to warm up and measure. `total_s` bounds the wall clock from the start of main() (give or take
    the round in flight): each shape gets an equal share of what is left, so a busy machine costs rounds
    (shown in the table), not time.
    """

    total_s: float
    warmup_max_s: float  # per path
    min_rounds: int  # aimed for: reached on a quiet machine, cut short (never below 3) by the shape's deadline
    max_rounds: int
    measure_s: float  # per shape, all paths together, once min_rounds are in


# The deadline is split into one share per (shape, dtype) and TRAINING_SHARES for the training step; compiles
# come out of each share. Full: ~4 min on a quiet 2-core machine (the deadline, rounds cut to fit), plus ~7 s of
# imports.
FULL = Budget(total_s=240.0, warmup_max_s=6.0, min_rounds=15, max_rounds=200, measure_s=20.0)
# Quick: ~37 s in all with a warm Inductor cache on a quiet machine. Compiles come out of the deadline but
# MIN_ROUNDS do not, so an empty cache and a busy machine stretch it: ~110 s when bf16 was first compiled here
# while other processes used ~45 % of the cores.
QUICK = Budget(total_s=60.0, warmup_max_s=1.5, min_rounds=5, max_rounds=50, measure_s=2.0)
MIN_ROUNDS = 3  # a median of fewer is not one
TRAINING_SHARES = 2  # the training section's part of the deadline, in (shape, dtype) shares


# ---- Environment ----------------------------------------------------------------------------------------



def environment(args, budget: Budget) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moefuse": moefuse.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "seed": args.seed,
        "mode": ("quick" if args.quick else "full") + (", cold cache" if args.cold_cache else ""),
        "budget": asdict(budget),
    }


# ---- The block and its paths --------------------------------------------------------------------------

def build_blocks(shape: Shape, seed: int, dtype: torch.dtype) -> tuple:
    """(eager-loop block, grouped_mm block, fp32 eager-loop block) sharing one set of random weights.

    The weights are drawn in fp32 (the same draw for every dtype) and rounded to `dtype`; the third block is the
    eager loop in fp32 with those rounded weights, the reference the bf16 paths are checked against (for fp32
    it is the first block itself). The experts read `config._experts_implementation` at every call, so each
    implementation gets its own config (and block) rather than flipping a shared one between calls.
    """
    blocks = []
    for impl in ("eager", "grouped_mm"):
        config = transformers.Qwen3MoeConfig(
            hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
            num_experts_per_tok=shape.top_k, norm_topk_prob=True,
        )
        config._experts_implementation = impl
        blocks.append(Qwen3MoeSparseMoeBlock(config).eval())
    loop, grouped = blocks
    torch.manual_seed(seed)
    std = loop.experts.config.initializer_range
    for p in loop.parameters():  # the router included: a zero router (its default) ties every top-k
        torch.nn.init.normal_(p, std=std)
    ref32 = loop
    if dtype != torch.float32:
        loop.to(dtype)
        ref32 = copy.deepcopy(loop).float()  # the rounded weights, exactly, in fp32
    grouped.load_state_dict(loop.state_dict(), assign=True)  # same tensors, no copy
    assert grouped.experts.gate_up_proj.data_ptr() == loop.experts.gate_up_proj.data_ptr()
    assert grouped.experts.gate_up_proj.dtype == dtype
    return loop, grouped, ref32


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref).abs().max().item()


class Checker:
    """Checks each path's output for one (shape, dtype) and records its max error.

    fp32: against the eager loop with rtol 1e-4, atol 1e-5 — fp32 through different GEMM blockings and summation
    orders lands ~1e-7 relative apart, while a path that drops or doubles an expert is O(1) off.

    bf16: against the fp32 eager loop on the same bf16-rounded weights and the bf16 input upcast, with the routing
    the bf16 router chose (its top-k ids and bf16 weights). The routing is pinned because the bf16 router's
    logits are rounded to bf16: a near-tie among the experts then flips some token's choice against the fp32
    router's, an O(1) difference in that token that no rounding tolerance should have to absorb. What is left is
    the expert math's rounding, and the tolerance comes from it: every path's max error may be at most
    BF16_ERR_FACTOR × the bf16 eager loop's own max error against that reference, plus BF16_ATOL.
    """

    def __init__(self, dtype: torch.dtype, loop, grouped, ref32, x: torch.Tensor):
        self.dtype, self.errors = dtype, {}
        self.loop_out = loop(x)
        if dtype == torch.float32:
            self.ref, self.tol = self.loop_out, None
        else:
            x2d = x.view(-1, x.shape[-1])
            _, topk_w, topk_ids = grouped.gate(x2d)
            self.ref = ref32.experts(x2d.float(), topk_ids, topk_w.float()).view(x.shape)
            self.tol = BF16_ERR_FACTOR * _max_err(self.loop_out, self.ref) + BF16_ATOL
        self(LOOP, self.loop_out)

    def __call__(self, name: str, out: torch.Tensor) -> None:
        out = out.view(self.ref.shape)
        if out.dtype != self.dtype:
            raise SystemExit(f"{name}: output is {out.dtype}, expected {self.dtype}")
        self.errors[name] = _max_err(out, self.ref)
        if self.tol is None:
            torch.testing.assert_close(out, self.ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} disagrees with the loop: {m}")
        elif self.errors[name] > self.tol:
            raise SystemExit(f"{name} ({self.dtype}): max error {self.errors[name]:.3g} against the fp32 loop on the "
                             f"same weights and routing, over the bf16 tolerance {self.tol:.3g} "
                             f"({BF16_ERR_FACTOR:g}× the bf16 eager loop's {self.errors.get(LOOP, 0):.3g} "
                             f"+ {BF16_ATOL:g})")


def with_torch_plan(fn):
    """`fn` with MOEFUSE_CPU_KERNELS=0 set during the call (moefuse's CPU path then runs its torch plan), and the
    variable restored after it."""
    def call():
        before = os.environ.get(KERNELS_ENV)
        os.environ[KERNELS_ENV] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[KERNELS_ENV]
            else:
                os.environ[KERNELS_ENV] = before
    return call


def prepare_paths(shape: Shape, dtype: torch.dtype, blocks, x: torch.Tensor) -> tuple[dict, dict]:
    """Compile and check every path for this shape and dtype; returns ({path: callable}, facts for the report)."""
    torch._dynamo.reset()  # a static graph per shape; no entries left over from the previous one
    loop, grouped, ref32 = blocks
    facts = {}
    check = Checker(dtype, loop, grouped, ref32, x)

    graph_ops: set[str] = set()

    def inductor_backend(gm, example_inputs):
        # What backend="inductor" runs (and moefuse's inner compiler), recording the ops it is handed so the
        # report can say which GEMM the transformers path really compiled.
        from torch._inductor.compile_fx import compile_fx

        graph_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    t0 = time.perf_counter()
    inductor = torch.compile(grouped, backend=inductor_backend, dynamic=False)
    out = inductor(x)
    facts["compile_s_inductor"] = time.perf_counter() - t0
    check(GROUPED_INDUCTOR, out)
    facts["inductor_gemm_ops"] = sorted(op for op in graph_ops if "grouped_mm" in op or op.endswith(("mm", "bmm")))

    backend = moefuse.Backend({"inner": "inductor"})
    t0 = time.perf_counter()
    fused = torch.compile(grouped, backend=backend, dynamic=False)
    out = fused(x)
    facts["compile_s_moefuse"] = time.perf_counter() - t0
    check(MOEFUSE, out)
    lowered = backend.explanation.lowered
    if len(lowered) != 1:
        raise SystemExit(f"{shape.label()} {dtype}: moefuse lowered {len(lowered)} layers, expected 1:\n"
                         f"{backend.explanation}")
    facts["moefuse_report"] = str(backend.explanation)
    spec = lowered[0].spec

    # The report alone is not proof (lower=False still lists the layer): the op must run once per call,
    # and only in the moefuse path.
    for name, fn, expected in ((MOEFUSE, fused, 1), (GROUPED_INDUCTOR, inductor, 0)):
        before = moefuse_op.counters["cpu"]
        fn(x)
        if moefuse_op.counters["cpu"] - before != expected:
            ran = moefuse_op.counters["cpu"] - before
            raise SystemExit(f"{name}: moefuse::moe ran {ran}× per call, expected {expected}")

    x2d = x.view(-1, shape.hidden)
    _, topk_w, topk_ids = grouped.gate(x2d)
    w1, w2 = grouped.experts.gate_up_proj, grouped.experts.down_proj

    def op_alone():
        return moefuse_op.moe_call(spec, x2d, topk_ids, topk_w, w1, w2)

    op_torch_plan = with_torch_plan(op_alone)
    # Which CPU path each op row runs: the generated kernels unless they cannot run here (then both rows are
    # the torch plan, and the run says so).
    from moefuse.kernels import cpu as cpu_kernels

    out_dtype = getattr(torch, spec.out_dtype)
    facts["cpu_kernels_unavailable"] = cpu_kernels.unavailable(spec, x2d, w1, w2, None, out_dtype)
    facts["cpu_kernels_unavailable_torch_plan"] = with_torch_plan(
        lambda: cpu_kernels.unavailable(spec, x2d, w1, w2, None, out_dtype))()
    assert facts["cpu_kernels_unavailable_torch_plan"] == f"{KERNELS_ENV}=0"

    check(MOEFUSE_OP, op_alone())
    check(MOEFUSE_TORCH, op_torch_plan())
    check(GROUPED, grouped(x))
    facts["max_error"] = dict(check.errors)
    facts["reference"] = "the eager loop" if check.tol is None else "fp32 eager loop, same weights and routing"
    facts["tolerance"] = check.tol
    facts["experts_hit"] = int(topk_ids.unique().numel())
    paths = {LOOP: lambda: loop(x), GROUPED: lambda: grouped(x), GROUPED_INDUCTOR: lambda: inductor(x),
             MOEFUSE: lambda: fused(x), MOEFUSE_OP: op_alone, MOEFUSE_TORCH: op_torch_plan}
    return paths, facts


def floor_probes(shape: Shape, dtype: torch.dtype, big: torch.Tensor) -> dict:
    """Dense GEMMs in `dtype` with the experts' exact FLOPs and M/N/K (weights as F.linear stores them), and a
    large read."""
    g = torch.Generator().manual_seed(1)
    rows = shape.tokens * shape.top_k
    a1 = torch.randn(rows, shape.hidden, generator=g).to(dtype)
    b1 = torch.randn(shape.up_rows, shape.hidden, generator=g).to(dtype)
    a2 = torch.randn(rows, shape.intermediate, generator=g).to(dtype)
    b2 = torch.randn(shape.hidden, shape.intermediate, generator=g).to(dtype)

    def dense_mm():
        torch.mm(a1, b1.t())
        torch.mm(a2, b2.t())

    return {DENSE_MM: dense_mm, READ_512M: big.sum}


def floor_from(shape: Shape, dtype: torch.dtype, med: dict[str, float], experts_hit: int, big: torch.Tensor) -> dict:
    """The floor terms from the probes' median times (ms)."""
    mm_flops_per_s = shape.flops / (med[DENSE_MM] / 1e3)  # the probe has exactly the experts' FLOPs
    read_bytes_per_s = big.numel() * big.element_size() / (med[READ_512M] / 1e3)
    touched = experts_hit * shape.expert_bytes(dtype.itemsize)
    compute_ms = shape.flops / mm_flops_per_s * 1e3
    memory_ms = touched / read_bytes_per_s * 1e3
    return {
        "flops": shape.flops, "mm_gflop_per_s": mm_flops_per_s / 1e9, "compute_ms": compute_ms,
        "experts_hit": experts_hit, "bytes_touched": touched, "read_gb_per_s": read_bytes_per_s / 1e9,
        "memory_ms": memory_ms, "floor_ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
    }


# ---- Timing ---------------------------------------------------------------------------------------------

def _call_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def warm_up(fn, max_s: float) -> int:
    """Call `fn` until three consecutive calls agree within 25 % or `max_s` is spent; returns the calls made.

    First calls can be far slower than the steady state: at decode (1–2 rows per expert) transformers'
    grouped_mm took ~9 calls, 600 ms → 9 ms each, to settle here.
    """
    times, t_end = [], time.perf_counter() + max_s
    while True:
        times.append(_call_ms(fn))
        last = times[-3:]
        if len(times) >= 3 and max(last) <= 1.25 * min(last) or time.perf_counter() > t_end:
            return len(times)


class OtherLoad:
    """Context manager: the share of the machine's cores that other processes (and the hypervisor, as steal)
    used while it was open, from /proc/stat minus this process's own CPU time; None where /proc is missing.
    Timings are only as good as this number is small."""

    share: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def __enter__(self) -> OtherLoad:
        self._start = (self._busy_s(), self._own_s(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = self._busy_s(), self._own_s(), time.perf_counter()
        if busy0 is not None and busy1 is not None and t1 > t0:
            self.share = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())


def wait_for_quiet(max_s: float, threshold: float = 0.1) -> float | None:
    """Wait (up to max_s) until other processes use under `threshold` of the cores over a 1 s window; returns
    the last window's share. On a shared 2-core machine somebody's test run slowed these paths 10–100×."""
    t_end = time.perf_counter() + max_s
    while True:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.share is None or load.share < threshold or time.perf_counter() > t_end:
            return load.share


def measure(fns: dict, budget: Budget, until: float, before_each=None) -> tuple[dict[str, list[float]], float | None]:
    """Interleaved rounds: one call of every function per round, the order rotated each round; also returns
    the share of the cores other processes used meanwhile (see OtherLoad). Stops after budget.measure_s once
    budget.min_rounds are in, and at `until` (perf_counter) once MIN_ROUNDS are. `before_each` runs, untimed,
    before every call (--cold-cache)."""
    names = list(fns)
    times = {n: [] for n in names}
    with OtherLoad() as load:
        soft_end = time.perf_counter() + budget.measure_s
        for r in range(budget.max_rounds):
            now = time.perf_counter()
            if r >= budget.min_rounds and now > soft_end or r >= MIN_ROUNDS and now > until:
                break
            for i in range(len(names)):
                n = names[(r + i) % len(names)]
                if before_each is not None:
                    before_each()
                times[n].append(_call_ms(fns[n]))
    return times, load.share


# ---- One shape ------------------------------------------------------------------------------------------

def run_shape(shape: Shape, dtype: torch.dtype, seed: int, budget: Budget, until: float, big: torch.Tensor, blocks,
              wait_s: float, evict: torch.Tensor | None) -> tuple[list[dict], dict]:
    """Compile, check, warm up and time every path for one shape and dtype; `until` (perf_counter) ends the
    timing."""
    x = torch.randn(1, shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(seed + shape.tokens))
    x = x.to(dtype)  # the same draw for every dtype, rounded
    paths, facts = prepare_paths(shape, dtype, blocks, x)
    fns = {**paths, **floor_probes(shape, dtype, big)}
    # Warm-up may take up to a third of what is left for this shape, the rest is for the rounds.
    warmup_s = min(budget.warmup_max_s, (until - time.perf_counter()) / 3 / len(fns))
    facts["warmup_calls"] = {n: warm_up(fn, warmup_s) for n, fn in fns.items()}
    t0 = time.perf_counter()
    facts["others_cpu_share_before"] = wait_for_quiet(wait_s) if wait_s else None
    facts["waited_s"] = time.perf_counter() - t0
    until += facts["waited_s"]  # waiting is the user's choice (--wait-quiet), not the budget's
    times, facts["others_cpu_share"] = measure(fns, budget, until, before_each=None if evict is None else evict.sum)
    med = {n: statistics.median(t) for n, t in times.items()}
    floor = floor_from(shape, dtype, med, facts["experts_hit"], big)
    floor_ms = floor["floor_ms"]
    best_tf = min(med[n] for n in TRANSFORMERS_PATHS)
    base = {"shape": shape.short, "dtype": SHORT[dtype], "tokens": shape.tokens, "experts": shape.experts,
            "top_k": shape.top_k, "hidden": shape.hidden, "intermediate": shape.intermediate}
    rows = [{**base, "path": f"floor ({floor['bound']}-bound)", "median_ms": floor_ms, "x_floor": 1.0,
             "x_best_transformers": floor_ms / best_tf, "rounds": len(times[DENSE_MM])}]
    for n in paths:
        t = sorted(times[n])
        rows.append({**base, "path": n, "median_ms": med[n], "p25_ms": t[len(t) // 4], "p75_ms": t[3 * len(t) // 4],
                     "x_floor": med[n] / floor_ms, "x_best_transformers": med[n] / best_tf, "rounds": len(t)})
    return rows, {**facts, "floor": floor}


# ---- Training step --------------------------------------------------------------------------------------

def build_lm(seed: int) -> torch.nn.Module:
    """The tiny Qwen3-MoE causal LM of TRAIN_CONFIG in fp32 (transformers' own init, seeded), its experts on
    grouped_mm."""
    config = transformers.Qwen3MoeConfig(**TRAIN_CONFIG)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(config).train()


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss  # next-token cross-entropy (transformers shifts the labels)


def _grads(model, call, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _lm_loss(call, ids).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _grad_errs(got: dict, ref: dict) -> dict[str, float]:
    """Each parameter's relative gradient error ‖g − g_ref‖ / ‖g_ref‖."""
    if got.keys() != ref.keys():
        raise SystemExit(f"training: gradients for different parameters: {sorted(got.keys() ^ ref.keys())}")
    return {n: ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}


def prepare_training(dtype: torch.dtype, model32, ids: torch.Tensor) -> tuple[dict, dict]:
    """The two training steps for `dtype` ({path: step}), compiled and checked, and facts for the report.

    Gradients, each parameter's relative error ‖g − g_ref‖ / ‖g_ref‖: fp32 — moefuse's against transformers',
    ≤ 1e-4 for every parameter. bf16 — both against the same model in fp32 on the bf16-rounded weights; moefuse's
    error in each parameter may be at most BF16_ERR_FACTOR × transformers' own error in it, plus BF16_ATOL. Both
    bf16 models route from bf16 router logits, so a near-tie can flip a token's experts against the fp32 model's
    (the expert gradients of both are ~5–10 % off for it); a per-parameter bound, not one over all parameters,
    keeps that from loosening the check on the others.
    """
    layers = TRAIN_CONFIG["num_hidden_layers"]
    model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype)
    backend = moefuse.Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    facts = {}

    def moefuse_step():
        before = moefuse_op.counters["fwd_train_cpu"], moefuse_op.counters["bwd_cpu"]
        model.zero_grad(set_to_none=True)
        _lm_loss(compiled, ids).backward()
        ran = moefuse_op.counters["fwd_train_cpu"] - before[0], moefuse_op.counters["bwd_cpu"] - before[1]
        if ran != (layers, layers):
            raise SystemExit(f"training {dtype}: moefuse::moe_fwd / moe_bwd ran {ran} times in a step, expected "
                             f"{layers} each")

    def eager_step():
        model.zero_grad(set_to_none=True)
        _lm_loss(model, ids).backward()

    t0 = time.perf_counter()
    got = _grads(model, compiled, ids)
    facts["compile_s_moefuse"] = time.perf_counter() - t0
    lowered = backend.explanation.lowered
    if len(lowered) != layers:
        raise SystemExit(f"training {dtype}: moefuse lowered {len(lowered)} layers, expected {layers}:\n"
                         f"{backend.explanation}")
    facts["moefuse_report"] = str(backend.explanation)
    moefuse_step()  # the counters: the fused training forward and backward ran once per layer
    ref = _grads(model, model, ids)
    if dtype == torch.float32:
        errs = _grad_errs(got, ref)
        worst = max(errs, key=errs.get)
        facts["grad_check"] = {"worst_parameter": worst, "moefuse_vs_transformers": errs[worst], "tolerance": 1e-4}
        if errs[worst] > 1e-4:
            raise SystemExit(f"training fp32: moefuse's gradient of {worst} is {errs[worst]:.3g} (relative) off "
                             "transformers'; tolerance 1e-4")
    else:
        ref32 = copy.deepcopy(model).float()  # the rounded weights, exactly, in fp32
        exact = _grads(ref32, ref32, ids)
        tf_errs, errs = _grad_errs(ref, exact), _grad_errs(got, exact)
        tols = {n: BF16_ERR_FACTOR * tf_errs[n] + BF16_ATOL for n in exact}
        worst = max(errs, key=lambda n: errs[n] / tols[n])  # the parameter closest to its tolerance
        facts["grad_check"] = {"worst_parameter": worst, "moefuse_vs_fp32": errs[worst],
                               "transformers_vs_fp32": tf_errs[worst], "tolerance": tols[worst],
                               "max_moefuse_vs_fp32": max(errs.values()),
                               "max_transformers_vs_fp32": max(tf_errs.values())}
        if errs[worst] > tols[worst]:
            raise SystemExit(f"training bf16: moefuse's gradient of {worst} is {errs[worst]:.3g} (relative) off the "
                             f"fp32 model's, over {tols[worst]:.3g} ({BF16_ERR_FACTOR:g}× transformers' bf16 error "
                             f"{tf_errs[worst]:.3g} + {BF16_ATOL:g})")
    return {TRAIN_EAGER: eager_step, TRAIN_MOEFUSE: moefuse_step}, facts


def run_training(dtypes: list[torch.dtype], seed: int, budget: Budget, until: float, wait_s: float,
                 evict: torch.Tensor | None) -> tuple[list[dict], dict]:
    """Compile, check, warm up and time one training step (zero grads, forward, loss, backward) per path and
    dtype, all of them interleaved in the same rounds."""
    torch._dynamo.reset()
    model32 = build_lm(seed)
    ids = torch.randint(0, TRAIN_CONFIG["vocab_size"], TRAIN_BATCH, generator=torch.Generator().manual_seed(seed))
    fns, facts = {}, {"config": TRAIN_CONFIG, "batch": list(TRAIN_BATCH), "experts_implementation": "grouped_mm"}
    for dtype in dtypes:
        steps, facts[SHORT[dtype]] = prepare_training(dtype, model32, ids)
        fns.update({(SHORT[dtype], n): fn for n, fn in steps.items()})
    warmup_s = min(budget.warmup_max_s, (until - time.perf_counter()) / 3 / len(fns))
    facts["warmup_calls"] = {" ".join(k): warm_up(fn, warmup_s) for k, fn in fns.items()}
    t0 = time.perf_counter()
    facts["others_cpu_share_before"] = wait_for_quiet(wait_s) if wait_s else None
    facts["waited_s"] = time.perf_counter() - t0
    until += facts["waited_s"]
    times, facts["others_cpu_share"] = measure(fns, budget, until, before_each=None if evict is None else evict.sum)
    rows = []
    for dtype in dtypes:
        d = SHORT[dtype]
        eager_ms = statistics.median(times[(d, TRAIN_EAGER)])
        for n in (TRAIN_EAGER, TRAIN_MOEFUSE):
            t = sorted(times[(d, n)])
            med = statistics.median(t)
            rows.append({"dtype": d, "path": n, "median_ms": med, "p25_ms": t[len(t) // 4],
                         "p75_ms": t[3 * len(t) // 4], "x_transformers": med / eager_ms, "rounds": len(t)})
    return rows, facts


# ---- Report ---------------------------------------------------------------------------------------------

def _share(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.0f} %"


def table(rows: list[dict], columns: tuple[tuple[str, str], ...]) -> str:
    """A markdown table: `columns` are (heading, row key); floats print with 2 decimals, "p25_ms" as the spread."""
    head = tuple(h for h, _ in columns)
    lines = []
    for r in rows:
        cells = []
        for _, key in columns:
            if key == "p25_ms":
                cells.append(f"{r['p25_ms']:.2f}–{r['p75_ms']:.2f}" if "p25_ms" in r else "")
            else:
                v = r.get(key, "")
                cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(tuple(cells))
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short warm-up and few rounds: < 90 s")
    p.add_argument("--json", type=Path, help="also write the rows (and the floor terms) as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="the dtypes of the blocks, their inputs and the training step (default: both)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--cold-cache", action="store_true",
                   help="read another 512 MiB tensor (untimed) before every timed call, so expert weights come "
                        "from DRAM as in a deep model rather than from a last-level cache that holds much of one block")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before timing each shape, wait up to S seconds for other processes to leave the cores idle")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtypes)]
    budget = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    deadline = t_start + budget.total_s
    env = environment(args, budget)
    env["dtypes"] = [SHORT[d] for d in dtypes]
    print(f"moefuse CPU benchmark — {env['date']}")
    print(f"torch {env['torch']}, transformers {env['transformers']}, moefuse {env['moefuse']}; "
          f"{env['threads']} threads; CPU: {env['cpu']} ({env['cores']} cores); "
          f"seed {env['seed']}; {', '.join(env['dtypes'])}; {env['mode']} mode")

    big = torch.ones(BANDWIDTH_BYTES // 4)  # written once, so every page is resident before it is timed
    # Not `big` itself: the read probe would then find the tail of `big` in the cache.
    evict = torch.ones(BANDWIDTH_BYTES // 4) if args.cold_cache else None
    rows, facts, blocks = [], {}, {}
    units = [(shape, dtype) for shape in SHAPES for dtype in dtypes]
    shares = len(units) + TRAINING_SHARES  # the deadline's split: one share per (shape, dtype), some for training
    with torch.no_grad():
        for i, (shape, dtype) in enumerate(units):
            until = time.perf_counter() + (deadline - time.perf_counter()) / (shares - i)
            experts = (shape.experts, shape.top_k, shape.hidden, shape.intermediate)
            # decode and T=64 share their experts: keep them (per dtype) until the experts change
            blocks = {k: v for k, v in blocks.items() if k[0] == experts}
            if (experts, dtype) not in blocks:
                blocks[experts, dtype] = build_blocks(shape, args.seed, dtype)
            r, f = run_shape(shape, dtype, args.seed, budget, until, big, blocks[experts, dtype], args.wait_quiet,
                             evict)
            deadline += f["waited_s"]
            rows += r
            facts[f"{shape.name} {SHORT[dtype]}"] = f
            fl = f["floor"]
            kernels = f["cpu_kernels_unavailable"]
            print(f"  {shape.label()} {SHORT[dtype]}: {fl['experts_hit']}/{shape.experts} experts hit, "
                  f"{shape.flops / 1e9:.2f} GFLOP at {fl['mm_gflop_per_s']:.1f} GFLOP/s = {fl['compute_ms']:.2f} ms, "
                  f"{fl['bytes_touched'] / 2**20:.0f} MiB at {fl['read_gb_per_s']:.1f} GB/s = "
                  f"{fl['memory_ms']:.2f} ms; "
                  f"compile {f['compile_s_inductor']:.1f} s (inductor: {', '.join(f['inductor_gemm_ops'])}), "
                  f"{f['compile_s_moefuse']:.1f} s (moefuse); "
                  + (f"CPU kernels NOT used ({kernels}); " if kernels else "")
                  + ("max error vs the loop " if f["tolerance"] is None
                     else f"max error vs the fp32 loop (tolerance {f['tolerance']:.2g}) ")
                  + ", ".join(f"{e:.1g}" for e in f["max_error"].values())
                  + f"; other processes used {_share(f['others_cpu_share'])} of the cores while timing")
        blocks.clear()

    train_rows, train_facts = run_training(dtypes, args.seed, budget, deadline, args.wait_quiet, evict)
    print(f"  training step: Qwen3-MoE causal LM {TRAIN_CONFIG['num_hidden_layers']} layers, "
          f"H={TRAIN_CONFIG['hidden_size']} E={TRAIN_CONFIG['num_experts']} K={TRAIN_CONFIG['num_experts_per_tok']} "
          f"I={TRAIN_CONFIG['moe_intermediate_size']}, batch {TRAIN_BATCH[0]}×{TRAIN_BATCH[1]} tokens; "
          + "; ".join(f"{SHORT[d]}: compile {train_facts[SHORT[d]]['compile_s_moefuse']:.1f} s (moefuse), "
                      + ", ".join(f"{k} {v:.2g}" for k, v in train_facts[SHORT[d]]["grad_check"].items()
                                  if isinstance(v, float))
                      for d in dtypes)
          + f"; other processes used {_share(train_facts['others_cpu_share'])} of the cores while timing")

    print()
    print(table(rows, (("shape", "shape"), ("dtype", "dtype"), ("path", "path"), ("median ms", "median_ms"),
                       ("× floor", "x_floor"), ("× best transformers", "x_best_transformers"),
                       ("p25–p75 ms", "p25_ms"), ("rounds", "rounds"))))
    print()
    print("Training step (zero grads, forward, loss, backward):")
    print(table(train_rows, (("dtype", "dtype"), ("path", "path"), ("median ms", "median_ms"),
                             ("× transformers", "x_transformers"), ("p25–p75 ms", "p25_ms"), ("rounds", "rounds"))))
    fused = {f"{r['shape']} {r['dtype']}": r["x_floor"] for r in rows if r["path"] == MOEFUSE}
    met = all(v <= TARGET_X_FLOOR for v in fused.values())
    print(f"\ntarget: moefuse within {TARGET_X_FLOOR}× of the floor at every shape — {'MET' if met else 'NOT MET'} ("
          + ", ".join(f"{k} {v:.2f}×" for k, v in fused.items()) + ")")
    plan = {(r["shape"], r["dtype"]): r["median_ms"] for r in rows if r["path"] == MOEFUSE_TORCH}
    print("moefuse op alone, generated C++ kernels vs the torch plan: "
          + ", ".join(f"{r['shape']} {r['dtype']} {plan[r['shape'], r['dtype']] / r['median_ms']:.2f}×"
                      for r in rows if r["path"] == MOEFUSE_OP) + " faster")
    noisy = {k: f["others_cpu_share"] for k, f in {**facts, "training": train_facts}.items()
             if (f["others_cpu_share"] or 0) > 0.1}
    if noisy:
        print("WARNING: other processes used " + ", ".join(f"{_share(v)} ({k})" for k, v in noisy.items())
              + " of the cores while timing; these medians are not a quiet machine's (try --wait-quiet 120)")
    env["wall_s"] = time.perf_counter() - t_start
    print(f"wall time {env['wall_s']:.0f} s")
    if args.json:
        doc = {"environment": env, "target": {"x_floor": TARGET_X_FLOOR, "met": met, "moefuse_x_floor": fused},
               "rows": rows, "shapes": facts, "training": {"rows": train_rows, **train_facts}}
        args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
