"""GPU benchmark: the experts of one MoE layer (Qwen3-MoE's, SwiGLU, bf16) through moefuse and the baselines,
on the same weights and the same routing, in one table.

Paths (each given x [T, H], topk_ids [T, K], topk_weights [T, K] → y [T, H]):
  transformers grouped_mm+inductor  Qwen3MoeExperts with `_experts_implementation="grouped_mm"` under
                                    torch.compile(backend="inductor")
  moefuse                           the same module under torch.compile(backend=moefuse.Backend(...)); the run
                                    stops unless the layer was lowered and every call ran the fused op
  liger fused MoE                   `liger_kernel.ops.fused_moe.LigerFusedMoEFunction`, when importable
  SonicMoE                          `sonicmoe.MoE` of the same sizes, when importable: its own router and
                                    weights, so timed but not checked

Per shape: the relative error (max |y - ref| / max |ref|) of y and of dx against transformers' eager
per-expert loop in float32 (float64 when the benchmark dtype is float32) on the same weights and routing; forward and forward+backward time, TFLOPS of
the expert GEMMs (forward 6·T·K·H·I, backward twice that) and peak memory above what was allocated before the
call. Shapes: SonicMoE's (T=24576 H=1536 I=256 E=128 K=8; T=32768 H=4096 I=512 E=128 K=8) and Qwen3-30B-A3B's
(H=2048 I=768 E=128 K=8) at T=16384, then decode latency at Qwen3-30B-A3B's shape for T = 1 … 64.

    python benchmarks/gpu.py [--json out.json] [--markdown out.md] [--autotune off|on] [--reps 20] [--shapes NAME ...]
    TRITON_INTERPRET=1 python benchmarks/gpu.py --tiny --compiler eager    # tiny shapes on the CPU, ~15 s

--tiny runs the same code on tiny shapes; on a CPU with TRITON_INTERPRET=1 moefuse runs its Triton kernels on
the interpreter (tests/test_gpu_bench.py does this), and `--compiler eager` spares Inductor's C++ builds.

Timing: CUDA events, median of --reps calls after --warmup untimed ones (the first call, which compiles, is
never timed); on the CPU perf_counter and no memory column. Consecutive shapes with one layer size (the decode
series) share the layer and its compiled code. moefuse's GEMM tile config is tuned per M bucket and cached on disk when --autotune on (the first run
tunes, minutes; later runs read the cache); --autotune off (default) uses the untuned defaults. No network.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moefuse
from _env import cpu_model  # benchmarks/_env.py: the scripts run as `python benchmarks/NAME.py`
from moefuse.runtime import op as moefuse_op
from moefuse.testing import EAGER_FACTOR, OUTPUT_ROUNDINGS, UNIT_ROUNDOFF, rel_err

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# moefuse's y and dx against the reference; the run fails past these. fp32: summation order only. bf16 / fp16:
# derived, not tabled — within EAGER_FACTOR × the error of transformers' eager loop in the same dtype plus
# OUTPUT_ROUNDINGS units of the dtype's roundoff, both against the fp32 reference (`tolerances`,
# `moefuse.testing.assert_parity`'s rule).
TOLERANCE = {torch.float32: 1e-4}

MOEFUSE, LIGER, SONIC = "moefuse", "liger fused MoE", "SonicMoE"
TRANSFORMERS = "transformers grouped_mm+{compiler}"


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # T
    experts: int  # E
    top_k: int  # K
    hidden: int  # H
    intermediate: int  # I
    train: bool = True  # also time forward+backward (not for decode)

    @property
    def fwd_flops(self) -> int:  # up [T·K, H]·[H, 2I] and down [T·K, I]·[I, H]
        return 6 * self.tokens * self.top_k * self.hidden * self.intermediate


QWEN3_30B = dict(experts=128, top_k=8, hidden=2048, intermediate=768)
SHAPES = (
    Shape("sonic-1.4B", 24576, 128, 8, 1536, 256),
    Shape("sonic-7B", 32768, 128, 8, 4096, 512),
    Shape("qwen3-30b-a3b", 16384, **QWEN3_30B),
    *(Shape(f"decode T={t}", t, **QWEN3_30B, train=False) for t in (1, 2, 4, 8, 16, 32, 64)),
)
# Under the Triton interpreter a forward takes ~0.3 s and a backward ~1 s: few, small shapes.
TINY_SHAPES = (
    Shape("tiny", 20, 6, 3, 32, 16),
    Shape("decode T=1", 1, 6, 3, 32, 16, train=False),
)


# ---- Devices: CUDA events and memory counters, or their CPU stand-ins -------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over `reps` calls (CUDA events on a GPU, perf_counter elsewhere)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated during fn() above what was allocated before it, MiB; None (and fn not run) off
    CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---- The layer, its routing and the reference ---------------------------------------------------------------


def make_experts(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                                         num_experts=shape.experts, num_experts_per_tok=shape.top_k)
    config._experts_implementation = "grouped_mm"
    experts = Qwen3MoeSparseMoeBlock(config).experts
    torch.manual_seed(seed)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=shape.hidden**-0.5)
    return experts.to(device=device, dtype=dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """x [T, H], softmax → top-k → renormalised routing (topk_ids int64, topk_weights), dy [T, H]."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(shape.tokens, shape.hidden, generator=g).to(device, dtype)
    probs = torch.randn(shape.tokens, shape.experts, generator=g).softmax(dim=-1)
    weights, ids = probs.topk(shape.top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(device, dtype)
    dy = torch.randn(shape.tokens, shape.hidden, generator=g).to(device, dtype)
    return x, ids.to(device), weights, dy


def reference(experts, x, ids, weights, dy, ref_dtype: torch.dtype, train: bool):
    """(y, dx) of a copy of the experts in ref_dtype running transformers' eager per-expert loop (grouped_mm
    takes no float64) on the same routing; dx is None unless train."""
    ref = copy.deepcopy(experts).to(ref_dtype)
    ref.config._experts_implementation = "eager"  # read at every call; the deep copy has its own config
    xr = x.detach().to(ref_dtype).requires_grad_(train)
    with torch.set_grad_enabled(train):
        y = ref(xr, ids, weights.to(ref_dtype))
    if not train:
        return y, None
    y.backward(dy.to(ref_dtype))
    return y.detach(), xr.grad


# ---- Paths ---------------------------------------------------------------------------------------------


def _op_calls() -> tuple[int, int]:
    """(forward, backward) calls of moefuse's fused ops so far, over every op and path."""
    fwd = sum(v for k, v in moefuse_op.counters.items() if "bwd" not in k)
    return fwd, sum(moefuse_op.counters.values()) - fwd


def build_paths(experts, shape: Shape, compiler: str, device: torch.device) -> tuple[dict, dict]:
    """({path: fn(x, ids, weights) -> y}, {path: why it is missing})."""
    paths, missing = {}, {}
    paths[TRANSFORMERS.format(compiler=compiler)] = torch.compile(experts, backend=compiler)
    backend = moefuse.Backend({"inner": compiler})
    fused = torch.compile(experts, backend=backend)

    def moefuse_path(x, ids, weights):
        before = _op_calls()
        y = fused(x, ids, weights)
        if _op_calls()[0] != before[0] + 1:
            raise SystemExit(f"T={x.shape[0]}: moefuse did not run its fused op:\n{backend.explanation}")
        return y

    moefuse_path.backend = backend
    paths[MOEFUSE] = moefuse_path

    if device.type != "cuda":
        missing[LIGER] = missing[SONIC] = "CUDA only"
        return paths, missing
    if importlib.util.find_spec("liger_kernel") is None:
        missing[LIGER] = "not installed"
    else:
        try:
            from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

            paths[LIGER] = lambda x, ids, weights: LigerFusedMoEFunction.apply(
                x, experts.gate_up_proj, experts.down_proj, ids.to(torch.int32), weights)
        except ImportError as exc:
            missing[LIGER] = f"no fused MoE in this version ({exc})"
    if importlib.util.find_spec("sonicmoe") is None:
        missing[SONIC] = "not installed"
    else:
        try:
            from sonicmoe import KernelBackendMoE, MoE
            from sonicmoe.enums import ActivationType

            sonic = MoE(num_experts=shape.experts, num_experts_per_tok=shape.top_k, hidden_size=shape.hidden,
                        intermediate_size=shape.intermediate, activation_function=ActivationType.SWIGLU,
                        add_bias=False, std=0.02).to(device=device, dtype=experts.gate_up_proj.dtype)
            paths[SONIC] = lambda x, ids, weights: sonic(x, kernel_backend_moe=KernelBackendMoE.sonicmoe)[0]
        except Exception as exc:  # its API moves between versions; the table says why the row is missing
            missing[SONIC] = f"{type(exc).__name__}: {exc}"
    return paths, missing


# ---- One shape ----------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One layer's experts and compiled paths, reused by consecutive shapes of its sizes (the decode series:
    dynamo marks T dynamic after the second token count, so seven decode shapes cost three compiles)."""

    sizes: tuple[int, int, int, int]  # E, K, H, I
    experts: torch.nn.Module
    paths: dict
    missing: dict


def layer_for(shape: Shape, previous: Layer | None, dtype, device, compiler: str, seed: int) -> Layer:
    sizes = (shape.experts, shape.top_k, shape.hidden, shape.intermediate)
    if previous is not None and previous.sizes == sizes:
        return previous
    torch._dynamo.reset()  # other weight shapes: nothing compiled before applies
    experts = make_experts(shape, dtype, device, seed)
    return Layer(sizes, experts, *build_paths(experts, shape, compiler, device))


def run_shape(shape: Shape, layer: Layer, dtype: torch.dtype, device: torch.device, warmup: int, reps: int,
              seed: int) -> list[dict]:
    experts, paths = layer.experts, layer.paths
    x, ids, weights, dy = make_inputs(shape, dtype, device, seed)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    y_ref, dx_ref = reference(experts, x, ids, weights, dy, ref_dtype, shape.train)
    limits = tolerances(experts, x, ids, weights, dy, dtype, shape.train, y_ref, dx_ref)
    rows = [dict(shape=shape.name, path=name, error=why) for name, why in layer.missing.items()]
    params = list(experts.parameters())
    for name, fn in paths.items():
        row = dict(shape=shape.name, path=name, tokens=shape.tokens)
        try:
            row.update(measure_path(name, fn, shape, x, ids, weights, dy, params, y_ref, dx_ref, device, warmup,
                                    reps))
        except SystemExit:
            raise
        except Exception as exc:  # a baseline failing (unsupported shape, API drift) must not end the run
            if name == MOEFUSE:
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
        if name == MOEFUSE:
            row.update({f"limit_{key}": limit for key, limit in limits.items()})
            check_moefuse(shape, row, limits, fn.backend)
    return rows


def tolerances(experts, x, ids, weights, dy, dtype, train: bool, y_ref, dx_ref) -> dict[str, float]:
    """The largest relative errors of moefuse's y and dx that pass: fp32's TOLERANCE; in bf16 / fp16
    EAGER_FACTOR × eager's (transformers' per-expert loop in the dtype, against the same fp32 reference) plus
    OUTPUT_ROUNDINGS units of the dtype's roundoff."""
    if dtype == torch.float32:
        return {"err_y": TOLERANCE[dtype], **({"err_dx": TOLERANCE[dtype]} if train else {})}
    y_eager, dx_eager = reference(experts, x, ids, weights, dy, dtype, train)
    floor = OUTPUT_ROUNDINGS * UNIT_ROUNDOFF[dtype]
    limits = {"err_y": EAGER_FACTOR * rel_err(y_eager, y_ref) + floor}
    if train:
        limits["err_dx"] = EAGER_FACTOR * rel_err(dx_eager, dx_ref) + floor
    return limits


def measure_path(name, fn, shape, x, ids, weights, dy, params, y_ref, dx_ref, device, warmup, reps) -> dict:
    """Errors against the reference, then median times and peak memory, forward and (if shape.train)
    forward+backward. The first call of each compiles (and tunes); `warmup` more run untimed."""
    row = {}
    checked = name != SONIC  # SonicMoE routes with its own router and weights
    with torch.no_grad():
        y = fn(x, ids, weights)  # compiles (and tunes, with --autotune on)
        if checked:
            row["err_y"] = rel_err(y, y_ref)
        fwd = lambda: fn(x, ids, weights)  # noqa: E731
        for _ in range(warmup):
            fwd()
        sync(device)
        ms = median_ms(fwd, device, reps)
        row.update(fwd_ms=ms, fwd_tflops=shape.fwd_flops / ms / 1e9, fwd_peak_mib=peak_mib(fwd, device))
    if not shape.train:
        return row
    x_leaf = x.detach().requires_grad_()
    w_leaf = weights.detach().requires_grad_()

    def train():
        for p in params:
            p.grad = None
        x_leaf.grad = w_leaf.grad = None
        fn(x_leaf, ids, w_leaf).backward(dy)

    train()  # compiles the training graph
    if checked:
        row["err_dx"] = rel_err(x_leaf.grad, dx_ref)
    for _ in range(warmup):
        train()
    sync(device)
    ms = median_ms(train, device, reps)
    row.update(train_ms=ms, train_tflops=3 * shape.fwd_flops / ms / 1e9, train_peak_mib=peak_mib(train, device))
    return row


def check_moefuse(shape: Shape, row: dict, limits: dict[str, float], backend) -> None:
    """The moefuse row must come from a lowered layer and match the reference within `tolerances`."""
    lowered = backend.explanation.lowered
    if not lowered:
        raise SystemExit(f"{shape.name}: moefuse lowered nothing:\n{backend.explanation}")
    for key, limit in limits.items():
        if key in row and not row[key] <= limit:
            raise SystemExit(f"{shape.name}: moefuse {key} = {row[key]:.3g} > {limit:.3g}")


# ---- Report -------------------------------------------------------------------------------------------


COLUMNS = (("shape", "shape", "{}"), ("path", "path", "{}"), ("err y", "err_y", "{:.1e}"),
           ("err dx", "err_dx", "{:.1e}"),
           ("fwd ms", "fwd_ms", "{:.3f}"), ("fwd TFLOPS", "fwd_tflops", "{:.1f}"),
           ("fwd peak MiB", "fwd_peak_mib", "{:.0f}"), ("fwd+bwd ms", "train_ms", "{:.3f}"),
           ("fwd+bwd TFLOPS", "train_tflops", "{:.1f}"), ("fwd+bwd peak MiB", "train_peak_mib", "{:.0f}"))


def table(rows: list[dict]) -> str:
    cells = [[title for title, _, _ in COLUMNS]]
    notes: dict[tuple[str, str], list[str]] = {}  # (path, why) -> shapes
    for row in rows:
        if "error" in row:
            notes.setdefault((row["path"], row["error"]), []).append(row["shape"])
            if "fwd_ms" not in row:
                continue
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
             for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes_text = [f"  {path}: {why} ({', '.join(shapes)})" for (path, why), shapes in notes.items()]
    return "\n".join(lines + (["", "not run:", *notes_text] if notes else []))


def markdown(rows: list[dict], env: dict) -> str:
    """The table as GitHub markdown, under a line naming the machine and versions, with the not-run notes."""
    head = [title for title, _, _ in COLUMNS]
    lines = [f"GPU benchmark — {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}, {env['dtype']}, autotune {env['autotune']}, {env['date']}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    notes = []
    for row in rows:
        if "error" in row:
            notes.append(f"- {row['path']} at {row['shape']}: {row['error']}")
            if "fwd_ms" not in row:
                continue
        lines.append("| " + " | ".join(fmt.format(row[key]) if row.get(key) is not None else "-"
                                       for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines + (["", "Not run:", *notes] if notes else [])) + "\n"


def write_results(args, env: dict, shapes, rows: list[dict]) -> None:
    """--json and --markdown, rewritten after every shape: a run cut short by a time limit keeps what it did."""
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "shapes": [asdict(s) for s in shapes], "rows": rows},
                                        indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows, env))


def environment(args, device: torch.device, dtype: torch.dtype) -> dict:
    import triton

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "moefuse": moefuse.__version__, "dtype": str(dtype).removeprefix("torch."), "compiler": args.compiler,
        "autotune": args.autotune, "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "reps": args.reps,
        "warmup": args.warmup,
        "seed": args.seed,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, the same code path (runs on the CPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA; float32 on the CPU, where the "
                   "Triton interpreter's bf16 dot is wrong")
    p.add_argument("--compiler", default="inductor", choices=("inductor", "eager"),
                   help="torch.compile backend of the baseline and moefuse's inner compiler")
    p.add_argument("--autotune", default="off", choices=("off", "on"), help="moefuse's GEMM autotuning")
    p.add_argument("--reps", type=int, help="timed calls per measurement (default 20; 1 with --tiny)")
    p.add_argument("--warmup", type=int, help="untimed calls after the first (default 3; 0 with --tiny)")
    p.add_argument("--shapes", nargs="+", metavar="NAME", help="run only these shapes (by name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows and the environment here")
    p.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    args.reps = args.reps or (1 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    os.environ["MOEFUSE_AUTOTUNE"] = "1" if args.autotune == "on" else "0"
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {s.name for s in shapes}
        if unknown:
            p.error(f"unknown shape(s) {sorted(unknown)}; known: {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in args.shapes]
    env = environment(args, device, dtype)
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    rows, t0, layer = [], time.perf_counter(), None
    for shape in shapes:
        layer = layer_for(shape, layer, dtype, device, args.compiler, args.seed)
        rows += run_shape(shape, layer, dtype, device, args.warmup, args.reps, args.seed)
        print(f"{shape.name} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        write_results(args, env, shapes, rows)
    print(table(rows))
    write_results(args, env, shapes, rows)
    return rows


if __name__ == "__main__":
    main()
