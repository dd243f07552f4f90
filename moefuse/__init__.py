"""moefuse: a torch.compile backend that finds Mixture-of-Experts layers and runs them as fused kernels.

    compiled = torch.compile(model, backend="moefuse")     # no import needed: an entry point
    print(moefuse.explain(model, input_ids))               # what was lowered, what was rejected and why
    print(moefuse.convert(model))                          # forms dynamo cannot capture: the op at module level
"""
from __future__ import annotations

from moefuse.spec import Activation, MoESpec

__version__ = "0.1.0"
__all__ = ["Activation", "Backend", "MoESpec", "convert", "explain", "last_report", "load_converted",
           "parallelize_experts", "reports"]


def __getattr__(name):
    # The compiler pulls in torch.fx and the runtime; keep `import moefuse` cheap until it is used.
    if name in ("Backend", "last_report", "reports"):
        from moefuse.compiler import backend

        return getattr(backend, name)
    if name == "convert":  # module-level lowering of MoE forms dynamo cannot capture (eager expert loops, …)
        from moefuse.conversion import convert

        return convert
    if name == "load_converted":  # a checkpoint written by moefuse-convert, ready to run
        from moefuse.checkpoint import load_converted

        return load_converted
    if name == "parallelize_experts":
        from moefuse.parallel import parallelize_experts

        return parallelize_experts
    raise AttributeError(f"module 'moefuse' has no attribute {name!r}")


def explain(model, *args, options: dict | None = None, **kwargs):
    """Compile `model` with moefuse, run it once on the given inputs, and return what was done.

    The returned `Explanation` prints one line per MoE layer lowered (with its spec and the kernels that
    run it) and one per candidate rejected (with a typed reason and a hint; a block that a graph break splits
    is reported with the op and source line of the break). The rest of the graph runs
    eagerly here (`inner="eager"` unless `options` says otherwise), so explaining is quick. Dynamo's caches
    are reset first so that every graph is seen; the model itself is not modified.
    """
    import torch

    from moefuse.compiler.backend import Backend

    opts = {"inner": "eager", **(options or {})}
    backend = Backend(opts)
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    _check_convert_hints(model, backend.explanation)
    return backend.explanation


# Rejections whose fix may be moefuse.convert: each gets a hint checked against the model itself.
_CONVERTIBLE = ("EXPERTS_OUTSIDE_GRAPH", "UNSUPPORTED_FORM")


def _check_convert_hints(model, explanation) -> None:
    """Replace the generic hint of each rejection convert might fix by what `moefuse.convert(model)` would really
    do to that module (a dry run: every replacement built and probed, the model unchanged)."""
    rejected = [r for r in explanation.rejected if r.reason.name in _CONVERTIBLE and type(r).__name__ == "Rejection"]
    if not rejected:
        return
    from moefuse.conversion import plan

    summary = plan(model)

    def related(a: str, b: str) -> bool:  # the block and its experts module, either way round
        a, b = ("" if a == "<top>" else a), ("" if b == "<top>" else b)
        return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.") or not a or not b

    for r in rejected:
        hit = next((m for m in summary.converted if related(r.module, m)), None)
        if hit is not None:
            r.checked_hint = f"moefuse.convert(model) converts {hit or 'the model'} (checked on a probe): call it " \
                             "before compiling"
            continue
        why = next((f"{m or 'the model'}: {w}" for m, w in summary.skipped.items() if related(r.module, m)), None)
        r.checked_hint = (f"moefuse.convert(model) does not convert it ({why})" if why else
                          "moefuse.convert(model) finds nothing to convert here; please file an issue with the "
                          "layer's code")
