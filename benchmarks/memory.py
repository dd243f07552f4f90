"""Activation memory saved for backward by one MoE layer: moefuse against transformers' grouped_mm.

moefuse's training op against transformers' grouped_mm experts under autograd, counted with saved-tensor
hooks, every number from the same run.

Block: `Qwen3MoeSparseMoeBlock` (router linear → softmax → top-k → renormalise → SwiGLU experts) built from a
`Qwen3MoeConfig` with `_experts_implementation = "grouped_mm"`, random weights, params requiring grad, input
x [1, T, d] requiring grad. Paths, per shape:

  transformers grouped_mm   the block in eager under autograd; on the CPU in eager transformers calls
                            `torch.nn.functional.grouped_mm` (torch > 2.10) or `transformers::grouped_mm_fallback`
                            — the run records which one ran
  moefuse (inner=eager)     torch.compile(block, backend=moefuse.Backend({"inner": "eager"})) in training
                            mode: the experts become one `moefuse::moe_fwd` whose autograd saves its inputs
                            and the pre-activation H [T·K, N1]; the router stays in the graph as plain ops
  router alone              `block.gate(x)` in eager: what the router (shared by both paths) saves

Counting: during ONE forward, `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves;
the pack hook records its storage (deduplicated by `untyped_storage().data_ptr()`, counted at the storage's
full size) and returns the tensor unchanged. "all" is every saved storage; "activations" leaves out storages
of the block's parameters and of its input x (alive anyway). Each storage is labelled with the autograd
nodes that saved it (a walk of the graph from the output, before backward). Then one backward runs on both
paths with the same upstream gradient, and x.grad (and every parameter's grad) is compared.

Bound (SonicMoE): 2·T·d + 4·T·K·n bytes for bf16 — x (T·d) and H (T·K·2n), two bytes each; scaled by
itemsize/2 for other dtypes (×2 in fp32). The bound includes x while "activations" leaves it out, so the
table gives activations ÷ bound and (activations + x) ÷ bound.

    python benchmarks/memory.py [--quick] [--json PATH] [--no-bf16] [--seed 0]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moefuse
from _env import cpu_model  # benchmarks/_env.py: the scripts run as `python benchmarks/NAME.py`
from moefuse.runtime import op as moefuse_op

MiB = 1 << 20
GRAD_RTOL = 1e-4  # fp32: ‖dx_moefuse − dx_transformers‖ / ‖dx_transformers‖
GRAD_RTOL_BF16 = 2e-2  # bf16: two different summation orders, 8 significant bits


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # T
    hidden: int  # d (H)
    intermediate: int  # n (I, moe_intermediate_size); N1 = 2n for SwiGLU
    experts: int  # E
    top_k: int  # K

    def label(self) -> str:
        return f"T={self.tokens} d={self.hidden} n={self.intermediate} E={self.experts} K={self.top_k}"

    def bound_bytes(self, dtype: torch.dtype) -> float:
        """SonicMoE's 2·T·d + 4·T·K·n bytes (bf16), scaled by itemsize/2."""
        T, d, n, K = self.tokens, self.hidden, self.intermediate, self.top_k
        return (2 * T * d + 4 * T * K * n) * torch.empty(0, dtype=dtype).element_size() / 2


# SonicMoE's 7B layer is T=24576 d=1536 n=256 E=128 K=8; T scaled to 2048 for two CPU cores. The next two keep
# T·K·n (so the bound's H term) and E·n (so the parameter count) and trade experts for width; the last is a
# Qwen3-30B-A3B layer at a small T.
SHAPES = (
    Shape("SonicMoE-7B (T 24576→2048)", 2048, 1536, 256, 128, 8),
    Shape("wider experts, same T·K·n", 2048, 1536, 512, 64, 4),
    Shape("widest experts, same T·K·n", 2048, 1536, 1024, 32, 2),
    Shape("Qwen3-30B-A3B-like", 512, 2048, 768, 128, 8),
)
QUICK_SHAPES = (Shape("SonicMoE-7B (T 24576→512)", 512, 1536, 256, 128, 8),)
BF16_SHAPE_INDEX = 0  # bf16 is tried on the first shape of the run only (time)

TRANSFORMERS, MOEFUSE, ROUTER = "transformers grouped_mm", "moefuse (inner=eager)", "router alone"


# ---- Environment ----------------------------------------------------------------------------------------



def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / (1 << 20)
    except (OSError, ValueError):
        pass
    return None


def environment(args) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moefuse": moefuse.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "mem_gib": mem_total_gib(),
        "seed": args.seed,
        "mode": "quick" if args.quick else "full",
    }


# ---- Counting -------------------------------------------------------------------------------------------

def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedCounter:
    """Context manager: every tensor autograd saves while it is open, deduplicated by storage."""

    def __init__(self, exclude: dict[int, str]):
        self.exclude = exclude  # storage ptr → "param" / "input"
        self.storages: dict[int, dict] = {}
        self.packs = 0

    def _pack(self, t: torch.Tensor):
        self.packs += 1
        s = t.untyped_storage()
        p = s.data_ptr()
        if p and p not in self.storages:
            self.storages[p] = {"bytes": s.nbytes(), "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                "kind": self.exclude.get(p, "activation"), "saved_by": set()}
        return t  # identity: the same tensor stays saved, memory is unchanged

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedCounter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def label(self, out: torch.Tensor) -> None:
        """Name the autograd nodes that saved each storage (walks the graph; call before backward)."""
        seen, stack = set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            name = node.name()
            tensors = []
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    try:
                        v = getattr(node, attr)
                    except Exception:  # noqa: BLE001 — a freed or non-tensor attribute
                        continue
                    tensors.extend(v if isinstance(v, (tuple, list)) else [v])
            try:  # custom autograd functions (moefuse::moe_fwd's formula) keep theirs in ctx.saved_tensors
                tensors.extend(node.saved_tensors)
            except Exception:  # noqa: BLE001
                pass
            for t in tensors:
                if isinstance(t, torch.Tensor) and _ptr(t) in self.storages:
                    self.storages[_ptr(t)]["saved_by"].add(name)
            stack.extend(n for n, _ in node.next_functions)

    def total(self, kinds=("activation", "param", "input")) -> int:
        return sum(s["bytes"] for s in self.storages.values() if s["kind"] in kinds)

    def detail(self) -> list[dict]:
        rows = [{**s, "saved_by": sorted(s["saved_by"]) or ["?"]} for s in self.storages.values()]
        return sorted(rows, key=lambda r: (r["kind"], -r["bytes"]))


class OpNames(TorchDispatchMode):
    """Records the ops dispatched below autograd (to see which grouped mm transformers ran)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ---- One shape ------------------------------------------------------------------------------------------

def build_block(shape: Shape, dtype: torch.dtype, seed: int) -> Qwen3MoeSparseMoeBlock:
    config = transformers.Qwen3MoeConfig(
        hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
        num_experts_per_tok=shape.top_k, norm_topk_prob=True,
    )
    config._experts_implementation = "grouped_mm"  # the experts read it at every call (integrations/moe.py)
    block = Qwen3MoeSparseMoeBlock(config)
    torch.manual_seed(seed)
    for p in block.parameters():  # the router too: its default zero init would tie every top-k
        torch.nn.init.normal_(p, std=config.initializer_range)
    return block.to(dtype).train()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def count_forward(fn, x: torch.Tensor, exclude: dict[int, str]) -> tuple[SavedCounter, torch.Tensor]:
    with SavedCounter(exclude) as counter:
        out = fn(x)
    counter.label(out)
    return counter, out


def run_shape(shape: Shape, dtype: torch.dtype, seed: int, options: dict) -> tuple[list[dict], dict]:
    torch._dynamo.reset()
    t0 = time.perf_counter()
    block = build_block(shape, dtype, seed)
    params = dict(block.named_parameters())
    g = torch.Generator().manual_seed(seed + shape.tokens)
    x = torch.randn(1, shape.tokens, shape.hidden, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(1, shape.tokens, shape.hidden, generator=g).to(dtype)
    exclude = {_ptr(p): "param" for p in params.values()}
    exclude[_ptr(x)] = "input"
    facts = {"dtype": str(dtype).replace("torch.", "")}

    # Router alone (eager): the part both paths share.
    router, out = count_forward(lambda x: block.gate(x.view(-1, shape.hidden))[1], x, exclude)
    del out

    # (a) transformers: which grouped mm runs (no grad needed to see the dispatch), then the count.
    with torch.no_grad(), OpNames() as names:
        block(x)
    ran = sorted(n for n in names.names if "grouped_mm" in n)
    facts["transformers_grouped_mm"] = ran
    ref, out = count_forward(block, x, exclude)
    out.backward(dy)
    grads_ref = {"x": x.grad.clone(), **{k: p.grad.clone() for k, p in params.items()}}
    del out
    x.grad = None
    block.zero_grad(set_to_none=True)

    # (b) moefuse: compile (first call, outside the hooks: dynamo tracing and the verifier run there), then
    # count a second call, which must neither recompile nor skip the fused op.
    backend = moefuse.Backend(options)
    compiled = torch.compile(block, backend=backend, dynamic=False)
    t1 = time.perf_counter()
    compiled(x).backward(dy)
    facts["compile_s"] = time.perf_counter() - t1
    lowered = backend.explanation.lowered
    if len(lowered) != 1 or not lowered[0].training:
        raise SystemExit(f"{shape.label()} {dtype}: expected 1 training lowering, got:\n{backend.explanation}")
    facts["moefuse_report"] = str(backend.explanation)
    x.grad = None
    block.zero_grad(set_to_none=True)
    graphs, calls = len(backend.explanation.reports), moefuse_op.counters["fwd_train_cpu"]
    fused, out = count_forward(compiled, x, exclude)
    if len(backend.explanation.reports) != graphs:
        raise SystemExit(f"{shape.label()}: the counted call recompiled")
    if moefuse_op.counters["fwd_train_cpu"] - calls != 1:
        raise SystemExit(f"{shape.label()}: moefuse::moe_fwd ran {moefuse_op.counters['fwd_train_cpu'] - calls}× "
                         "in the counted call, expected 1")
    out.backward(dy)
    del out
    errs = {"x": rel_err(x.grad, grads_ref["x"]),
            **{k: rel_err(p.grad, grads_ref[k]) for k, p in params.items()}}
    tol = GRAD_RTOL if dtype == torch.float32 else GRAD_RTOL_BF16
    if errs["x"] > tol:
        raise SystemExit(f"{shape.label()} {dtype}: input gradients differ, rel. error {errs['x']:.2e} > {tol:.0e}")
    facts["grad_rel_err"] = errs
    facts["grad_rtol"] = tol

    bound = shape.bound_bytes(dtype)
    x_bytes = x.untyped_storage().nbytes()
    base = {"shape": shape.name, **asdict(shape), "dtype": facts["dtype"], "bound_bytes": bound, "x_bytes": x_bytes}
    rows = []
    for path, c in ((TRANSFORMERS, ref), (MOEFUSE, fused), (ROUTER, router)):
        act = c.total(("activation",))
        rows.append({**base, "path": path, "all_bytes": c.total(), "activation_bytes": act,
                     "param_bytes": c.total(("param",)), "input_bytes": c.total(("input",)),
                     "act_over_bound": act / bound, "act_plus_x_over_bound": (act + x_bytes) / bound,
                     "saved_calls": c.packs, "saved": c.detail()})
    rows[1]["moefuse_over_transformers"] = rows[1]["activation_bytes"] / rows[0]["activation_bytes"]
    rows[0]["moefuse_over_transformers"] = 1.0
    for r in rows[:2]:  # what the experts part adds to the router's own saved tensors
        r["beyond_router_bytes"] = r["activation_bytes"] - rows[2]["activation_bytes"]
    facts["seconds"] = time.perf_counter() - t0
    return rows, facts


# ---- Report ---------------------------------------------------------------------------------------------

def _b(n: float) -> str:
    return f"{int(n):,} ({n / MiB:.1f} MiB)"


def table(rows: list[dict]) -> str:
    head = ("shape (T/d/n/E/K)", "dtype", "path", "saved, all", "activations (excl. params, x)", "act − router",
            "act ÷ bound", "(act + x) ÷ bound", "moefuse ÷ transformers")
    lines = []
    for r in rows:
        beyond = "" if r["path"] == ROUTER else f"{r['beyond_router_bytes'] / MiB:.1f} MiB"
        lines.append((f"{r['name']}: {r['tokens']}/{r['hidden']}/{r['intermediate']}/{r['experts']}/{r['top_k']}",
                      r["dtype"], r["path"], f"{r['all_bytes'] / MiB:.1f} MiB", _b(r["activation_bytes"]), beyond,
                      f"{r['act_over_bound']:.2f}", f"{r['act_plus_x_over_bound']:.2f}",
                      f"{r['moefuse_over_transformers']:.3f}" if "moefuse_over_transformers" in r and r["path"] == MOEFUSE
                      else ""))
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in lines])


def breakdown(rows: list[dict]) -> str:
    """The activation storages each path saved (one shape, one dtype)."""
    out = []
    for r in rows:
        out.append(f"  {r['path']}:")
        for s in r["saved"]:
            if s["kind"] == "activation":
                out.append(f"    {s['bytes'] / MiB:8.2f} MiB  {s['dtype']:8s} {str(s['shape']):18s} "
                           f"saved by {', '.join(s['saved_by'])}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one small shape, fp32 only, moefuse's verifier off (< 30 s on a quiet machine)")
    p.add_argument("--json", type=Path, help="also write the rows, every saved storage and the environment here")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 attempt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # dynamo tracing transformers' `_can_use_grouped_mm` warns about its lru_cache'd version checks (harmless)
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    t_start = time.perf_counter()
    env = environment(args)
    print(f"moefuse saved-for-backward memory — {env['date']}")
    print(f"torch {env['torch']}, transformers {env['transformers']}, moefuse {env['moefuse']}, python {env['python']}; "
          f"CPU: {env['cpu']} ({env['cores']} cores, {env['threads']} threads, "
          f"{env['mem_gib']:.0f} GiB); seed {env['seed']}; {env['mode']} mode")
    print("columns: T/d/n/E/K; bytes are storages autograd saved during one forward, deduplicated; "
          "bound = (2·T·d + 4·T·K·n)·itemsize/2 bytes\n")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    # --quick skips moefuse's compile-time verifier (~15 s of the 30): the run compares gradients anyway.
    options = {"inner": "eager", "verify": False} if args.quick else {"inner": "eager"}
    print(f"moefuse.Backend({options})")
    runs = [(s, torch.float32) for s in shapes]
    if not (args.quick or args.no_bf16):
        runs.append((shapes[BF16_SHAPE_INDEX], torch.bfloat16))
    rows, facts, failures = [], [], []
    for shape, dtype in runs:
        try:
            r, f = run_shape(shape, dtype, args.seed, options)
        except Exception as e:  # noqa: BLE001 — bf16 may not run on the CPU; fp32 failures are fatal
            if dtype == torch.float32:
                raise
            msg = f"{shape.label()} {dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"did not run: {msg}")
            failures.append(msg)
            continue
        rows += r
        facts.append({"shape": shape.label(), **f})
        print(f"{shape.name} ({shape.label()}, {f['dtype']}): transformers ran {', '.join(f['transformers_grouped_mm'])}; "
              f"moefuse lowered 1 layer (training), compile {f['compile_s']:.1f} s; "
              f"rel. error of dx {f['grad_rel_err']['x']:.1e}, worst param grad "
              f"{max(v for k, v in f['grad_rel_err'].items() if k != 'x'):.1e}; {f['seconds']:.1f} s")
        if len(rows) == 3:
            print("\nactivation storages at the first shape:\n" + breakdown(r) + "\n")
    print()
    print(table(rows))
    for f in failures:
        print(f"not in the table: {f}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows, "facts": facts, "failures": failures},
                                        indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
