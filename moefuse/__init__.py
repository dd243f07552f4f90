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
    return backend.explanation
