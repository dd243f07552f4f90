"""CPU benchmark: one Qwen3-MoE sparse MoE block (fp32, random weights) through transformers' experts paths and
moefuse, against a measured roofline floor, every number from the same run.

Paths, per shape:
  transformers eager loop           `_experts_implementation="eager"`: the per-expert Python loop
  transformers grouped_mm           `"grouped_mm"` in eager: one `torch.nn.functional.grouped_mm` per projection
  transformers grouped_mm+inductor  the same block under torch.compile(backend="inductor"); in fp32 dynamo routes
                                    the GEMMs to `transformers::grouped_mm_fallback` (a per-expert torch.mm loop)
  moefuse (inner=inductor)          torch.compile(block, backend=moefuse.Backend({"inner": "inductor"})); the run
                                    fails unless the layer was lowered and each call runs `moefuse::moe` once
  moefuse op alone                  `moefuse::moe` on the block's own routing: the fused op without the router
                                    and the rest of the graph

Floor: max(compute, memory). compute = expert-GEMM FLOPs (2·T·K·H·(N1 + I)) ÷ the rate of dense torch.mm calls
with exactly those FLOPs and M/N/K ([T·K, H]·[H, N1] and [T·K, I]·[I, H], the experts' work with no routing);
memory = bytes of the expert weights the routing touches (distinct experts hit × (N1·H + H·I) × 4) ÷ the read
bandwidth of summing a 512 MiB tensor. Both rates are timed in the same rounds as the paths.
Caveat for the memory-bound shapes: one block is re-read every call, and a last-level cache as large as this
VM's (sums of ≤ 96 MiB ran at 34–37 GB/s, ≥ 256 MiB at 15–16 GB/s) keeps part of its 123–192 MiB of expert
weights, so a path can come in under the DRAM floor. `--cold-cache` reads another 512 MiB tensor (untimed)
before every timed call, so weights come from DRAM as they would in a deep model.

Timing: every path is compiled, checked against the eager loop and warmed up first; then the paths (and the
two floor probes) run interleaved, one call each per round in a rotating order, so that a noisy neighbour
slows all of them alike; medians over the rounds. Compare ratios within one run, not times across runs.

    python benchmarks/cpu.py [--quick] [--json results.json] [--seed 0] [--cold-cache] [--wait-quiet S]
                             [--threads N]
"""
from __future__ import annotations

import argparse
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
    def expert_bytes(self) -> int:  # fp32 weights of one expert
        return (self.up_rows * self.hidden + self.hidden * self.intermediate) * 4

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

LOOP, GROUPED, GROUPED_INDUCTOR, MOEFUSE, MOEFUSE_OP = (
    "transformers eager loop", "transformers grouped_mm", "transformers grouped_mm+inductor",
    "moefuse (inner=inductor)", "moefuse op alone",
)
TRANSFORMERS_PATHS = (LOOP, GROUPED, GROUPED_INDUCTOR)
DENSE_MM, READ_512M = "floor probe: dense mm", "floor probe: read 512 MiB"


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


# Full: ~100 s on a quiet 2-core machine with a warm Inductor cache, ~150 s with an empty one.
FULL = Budget(total_s=225.0, warmup_max_s=6.0, min_rounds=15, max_rounds=200, measure_s=30.0)
# Quick: ~30 s in all with a warm Inductor cache; on an empty one the compiles alone take ~45 s, and the
# deadline (plus ~7 s of imports before it starts) still ends the run inside a minute, with fewer rounds.
QUICK = Budget(total_s=50.0, warmup_max_s=1.5, min_rounds=5, max_rounds=50, measure_s=2.0)
MIN_ROUNDS = 3  # a median of fewer is not one


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

def build_blocks(shape: Shape, seed: int) -> tuple[Qwen3MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock]:
    """(eager-loop block, grouped_mm block) sharing one set of random weights.

    The experts read `config._experts_implementation` at every call, so each implementation gets its own
    config (and block) rather than flipping a shared one between calls.
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
    grouped.load_state_dict(loop.state_dict(), assign=True)  # same tensors, no copy
    assert grouped.experts.gate_up_proj.data_ptr() == loop.experts.gate_up_proj.data_ptr()
    return loop, grouped


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 through different GEMM blockings and summation orders: ~1e-7 relative apart; 1e-4 still catches
    # a path that drops or doubles an expert (those differ by O(1) relative).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} disagrees with the loop: {m}")


def prepare_paths(shape: Shape, loop, grouped, x: torch.Tensor) -> tuple[dict, dict]:
    """Compile and check every path for this shape; returns ({path: callable}, facts for the report)."""
    torch._dynamo.reset()  # a static graph per shape; no entries left over from the previous one
    facts = {}
    ref = loop(x)

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
    check_close(GROUPED_INDUCTOR, out, ref)
    facts["inductor_gemm_ops"] = sorted(op for op in graph_ops if "grouped_mm" in op or op.endswith(("mm", "bmm")))

    backend = moefuse.Backend({"inner": "inductor"})
    t0 = time.perf_counter()
    fused = torch.compile(grouped, backend=backend, dynamic=False)
    out = fused(x)
    facts["compile_s_moefuse"] = time.perf_counter() - t0
    check_close(MOEFUSE, out, ref)
    lowered = backend.explanation.lowered
    if len(lowered) != 1:
        raise SystemExit(f"{shape.label()}: moefuse lowered {len(lowered)} layers, expected 1:\n{backend.explanation}")
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

    check_close(MOEFUSE_OP, op_alone().view_as(ref), ref)
    check_close(GROUPED, grouped(x), ref)
    facts["experts_hit"] = int(topk_ids.unique().numel())
    paths = {LOOP: lambda: loop(x), GROUPED: lambda: grouped(x), GROUPED_INDUCTOR: lambda: inductor(x),
             MOEFUSE: lambda: fused(x), MOEFUSE_OP: op_alone}
    return paths, facts


def floor_probes(shape: Shape, big: torch.Tensor) -> dict:
    """Dense GEMMs with the experts' exact FLOPs and M/N/K (weights as F.linear stores them), and a large read."""
    g = torch.Generator().manual_seed(1)
    rows = shape.tokens * shape.top_k
    a1 = torch.randn(rows, shape.hidden, generator=g)
    b1 = torch.randn(shape.up_rows, shape.hidden, generator=g)
    a2 = torch.randn(rows, shape.intermediate, generator=g)
    b2 = torch.randn(shape.hidden, shape.intermediate, generator=g)

    def dense_mm():
        torch.mm(a1, b1.t())
        torch.mm(a2, b2.t())

    return {DENSE_MM: dense_mm, READ_512M: big.sum}


def floor_from(shape: Shape, med: dict[str, float], experts_hit: int, big: torch.Tensor) -> dict:
    """The floor terms from the probes' median times (ms)."""
    mm_flops_per_s = shape.flops / (med[DENSE_MM] / 1e3)  # the probe has exactly the experts' FLOPs
    read_bytes_per_s = big.numel() * big.element_size() / (med[READ_512M] / 1e3)
    touched = experts_hit * shape.expert_bytes
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

def run_shape(shape: Shape, seed: int, budget: Budget, until: float, big: torch.Tensor, blocks, wait_s: float,
              evict: torch.Tensor | None) -> tuple[list[dict], dict]:
    """Compile, check, warm up and time every path for one shape; `until` (perf_counter) ends the timing."""
    x = torch.randn(1, shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(seed + shape.tokens))
    loop, grouped = blocks
    paths, facts = prepare_paths(shape, loop, grouped, x)
    fns = {**paths, **floor_probes(shape, big)}
    # Warm-up may take up to a third of what is left for this shape, the rest is for the rounds.
    warmup_s = min(budget.warmup_max_s, (until - time.perf_counter()) / 3 / len(fns))
    facts["warmup_calls"] = {n: warm_up(fn, warmup_s) for n, fn in fns.items()}
    t0 = time.perf_counter()
    facts["others_cpu_share_before"] = wait_for_quiet(wait_s) if wait_s else None
    facts["waited_s"] = time.perf_counter() - t0
    until += facts["waited_s"]  # waiting is the user's choice (--wait-quiet), not the budget's
    times, facts["others_cpu_share"] = measure(fns, budget, until, before_each=None if evict is None else evict.sum)
    med = {n: statistics.median(t) for n, t in times.items()}
    floor = floor_from(shape, med, facts["experts_hit"], big)
    floor_ms = floor["floor_ms"]
    best_tf = min(med[n] for n in TRANSFORMERS_PATHS)
    base = {"shape": shape.short, "tokens": shape.tokens, "experts": shape.experts, "top_k": shape.top_k,
            "hidden": shape.hidden, "intermediate": shape.intermediate}
    rows = [{**base, "path": f"floor ({floor['bound']}-bound)", "median_ms": floor_ms, "x_floor": 1.0,
             "x_best_transformers": floor_ms / best_tf, "rounds": len(times[DENSE_MM])}]
    for n in paths:
        t = sorted(times[n])
        rows.append({**base, "path": n, "median_ms": med[n], "p25_ms": t[len(t) // 4], "p75_ms": t[3 * len(t) // 4],
                     "x_floor": med[n] / floor_ms, "x_best_transformers": med[n] / best_tf, "rounds": len(t)})
    return rows, {**facts, "floor": floor}


# ---- Report ---------------------------------------------------------------------------------------------

def _share(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.0f} %"


def table(rows: list[dict]) -> str:
    head = ("shape", "path", "median ms", "× floor", "× best transformers", "p25–p75 ms", "rounds")
    lines = []
    for r in rows:
        spread = f"{r['p25_ms']:.2f}–{r['p75_ms']:.2f}" if "p25_ms" in r else ""
        lines.append((r["shape"], r["path"], f"{r['median_ms']:.2f}", f"{r['x_floor']:.2f}",
                      f"{r['x_best_transformers']:.2f}", spread, str(r["rounds"])))
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short warm-up and few rounds: < 60 s")
    p.add_argument("--json", type=Path, help="also write the rows (and the floor terms) as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--cold-cache", action="store_true",
                   help="read another 512 MiB tensor (untimed) before every timed call, so expert weights come "
                        "from DRAM as in a deep model rather than from a last-level cache that holds much of one block")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before timing each shape, wait up to S seconds for other processes to leave the cores idle")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    deadline = t_start + budget.total_s
    env = environment(args, budget)
    print(f"moefuse CPU benchmark — {env['date']}")
    print(f"torch {env['torch']}, transformers {env['transformers']}, moefuse {env['moefuse']}; "
          f"{env['threads']} threads; CPU: {env['cpu']} ({env['cores']} cores); "
          f"seed {env['seed']}; {env['mode']} mode")

    big = torch.ones(BANDWIDTH_BYTES // 4)  # written once, so every page is resident before it is timed
    # Not `big` itself: the read probe would then find the tail of `big` in the cache.
    evict = torch.ones(BANDWIDTH_BYTES // 4) if args.cold_cache else None
    rows, facts, blocks = [], {}, {}
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            until = time.perf_counter() + (deadline - time.perf_counter()) / (len(SHAPES) - i)
            experts = (shape.experts, shape.top_k, shape.hidden, shape.intermediate)
            if experts not in blocks:  # decode and T=64 share their experts
                blocks = {experts: build_blocks(shape, args.seed)}
            r, f = run_shape(shape, args.seed, budget, until, big, blocks[experts], args.wait_quiet, evict)
            deadline += f["waited_s"]
            rows += r
            facts[shape.name] = f
            fl = f["floor"]
            print(f"  {shape.label()}: {fl['experts_hit']}/{shape.experts} experts hit, "
                  f"{shape.flops / 1e9:.2f} GFLOP at {fl['mm_gflop_per_s']:.1f} GFLOP/s = {fl['compute_ms']:.2f} ms, "
                  f"{fl['bytes_touched'] / 2**20:.0f} MiB at {fl['read_gb_per_s']:.1f} GB/s = "
                  f"{fl['memory_ms']:.2f} ms; "
                  f"compile {f['compile_s_inductor']:.1f} s (inductor: {', '.join(f['inductor_gemm_ops'])}), "
                  f"{f['compile_s_moefuse']:.1f} s (moefuse); "
                  f"other processes used {_share(f['others_cpu_share'])} of the cores while timing")

    print()
    print(table(rows))
    fused = {r["shape"]: r["x_floor"] for r in rows if r["path"] == MOEFUSE}
    met = all(v <= TARGET_X_FLOOR for v in fused.values())
    print(f"\ntarget: moefuse within {TARGET_X_FLOOR}× of the floor at every shape — {'MET' if met else 'NOT MET'} ("
          + ", ".join(f"{k} {v:.2f}×" for k, v in fused.items()) + ")")
    noisy = {k: f["others_cpu_share"] for k, f in facts.items() if (f["others_cpu_share"] or 0) > 0.1}
    if noisy:
        print("WARNING: other processes used " + ", ".join(f"{_share(v)} ({k})" for k, v in noisy.items())
              + " of the cores while timing; these medians are not a quiet machine's (try --wait-quiet 120)")
    env["wall_s"] = time.perf_counter() - t_start
    print(f"wall time {env['wall_s']:.0f} s")
    if args.json:
        doc = {"environment": env, "target": {"x_floor": TARGET_X_FLOOR, "met": met, "moefuse_x_floor": fused},
               "rows": rows, "shapes": facts}
        args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
