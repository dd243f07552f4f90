"""moefuse.parallel: expert parallelism (EP) on torch.distributed — MoE layers whose experts outgrow one device.

    dist.init_process_group("gloo")                     # or "nccl"; one process per device
    moefuse.parallelize_experts(model, mesh)            # a 1-D DeviceMesh or a ProcessGroup (default: WORLD)
    compiled = torch.compile(model, backend="moefuse")
    print(moefuse.parallel.stats(model))                # per layer: pairs sent/received, imbalance

Layout. Every experts module moefuse can run (transformers' `@use_experts_implementation` experts, the same
modules `moefuse.convert` serves) keeps, on rank r of an EP group of size W, the contiguous block of experts
[r·E/W, (r+1)·E/W); E % W != 0 is refused (`ExpertParallelError`). Each of its parameters (gate_up_proj /
up_proj, down_proj, their biases) becomes a DTensor of global shape [E, …] placed `Shard(0)` on the 1-D mesh,
so `state_dict()` holds the global layout and `torch.distributed.checkpoint` saves and loads the shards as
they are (each rank writes and reads its own block). Everything else — attention, norms, embeddings, the
router, shared experts — stays an ordinary replicated tensor.

Forward of one layer, on every rank, with its own tokens x[T,H] and their routing (ids, weights)[T,K]:
  1. route locally: the router stays in the model, replicated; pair p = t·K + k goes to rank ids[p] // (E/W);
  2. exchange counts: one all-gather of each rank's [W] send counts gives the whole W×W matrix of pairs, read
     on the host once — the split sizes every all-to-all needs. This is the layer's only host sync (on a GPU a
     stream sync per layer per forward; the backward reuses the sizes and needs none);
  3. dispatch: all-to-all of the pairs' token rows (x[t], one row per pair, sorted by destination rank) and of
     their local expert ids;
  4. the local experts run as one `moefuse::moe` call (the training pair under autograd) with K=1 and unit
     weights, on whatever rows arrived — possibly none;
  5. all-to-all the expert outputs back, and combine at home: y[t] = Σ_k weights[t,k] · Y[pair (t,k)] in fp32.
The routing weight is applied at home, so the router's gradient never leaves its rank. Dropless and exact: no
capacity factor; every pair is computed once by its owner. A token whose k experts live on one rank is sent
k times (one row per pair), which keeps the op's K=1 contract simple at the price of some traffic.

Backward: both all-to-alls are autograd functions (their backward is the reverse all-to-all with the split
sizes swapped), so gradients flow to x and through it to the router and everything before. Expert weight
gradients stay on the owner rank (a DTensor grad, Shard(0)) and already sum the contributions of every rank's
tokens. Replicated parameters (router, shared experts, attention, embeddings) get the gradient of this rank's
tokens only: reduce them across the group as for any data-parallel parameter (all-reduce, DDP or FSDP2).
Every rank must run every forward and backward of the model (the collectives pair up across ranks), even a rank
with no tokens.

torch.compile: the experts module's forward is a graph break (`torch.compiler.disable`): the split sizes are
host integers that would otherwise specialise the graph on every batch's routing. The router and the rest of
the model compile as usual; the experts of each layer run as the same fused op, eagerly, between two graphs.
The backend's report therefore lists each layer's routing as EXPERTS_OUTSIDE_GRAPH — expected here (its hint
to call moefuse.convert does not apply to a parallelized model).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moefuse.convert import _activation_fn, _is_interface_experts, _spec_key, _weights, _why_not
from moefuse.errors import MoefuseError
from moefuse.passes.detect import capture_activation
from moefuse.passes.region import Reject
from moefuse.runtime.autograd import fused_moe

log = logging.getLogger("moefuse.parallel")

_ROUTER = "the model's own, replicated; pairs dispatched by all-to-all (moefuse.parallelize_experts)"
# torch 2.13 renamed the functional all-gather (the old name warns); earlier versions have only the old one.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor

__all__ = ["ExpertParallelError", "LayerStats", "ParallelSummary", "parallelize_experts", "stats"]


class ExpertParallelError(MoefuseError, ValueError):
    """A model or group that expert parallelism cannot shard as asked."""


@dataclass
class LayerStats:
    """One layer's traffic in its last forward, as this rank saw it. Counts are (token, expert) pairs."""

    rank: int
    sent: list[int]  # [W]: pairs this rank sent to each rank (its own included)
    received: list[int]  # [W]: pairs this rank's experts received from each rank
    load: list[int]  # [W]: pairs each rank's experts ran (the column sums of the group's count matrix)
    calls: int  # forwards run so far

    @property
    def imbalance(self) -> float:
        """max / mean of `load`: 1.0 when every rank's experts ran as many pairs; W when one rank ran all."""
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean else 1.0

    def __str__(self) -> str:
        return (f"rank {self.rank}: sent {sum(self.sent)} {self.sent}, received {sum(self.received)} "
                f"{self.received}, load per rank {self.load}, imbalance {self.imbalance:.2f}, calls {self.calls}")


@dataclass
class ParallelSummary:
    rank: int
    world: int
    sharded: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path → (first expert, E/W)

    def __str__(self) -> str:
        lines = [f"moefuse.parallelize_experts: rank {self.rank} of {self.world}, "
                 f"{len(self.sharded)} experts module(s) sharded"]
        lines += [f"  {m}: experts [{lo}, {lo + n})" for m, (lo, n) in self.sharded.items()]
        return "\n".join(lines)


@dataclass
class _EPState:
    mesh: DeviceMesh
    group: dist.ProcessGroup
    rank: int
    world: int
    local_experts: int
    calls: int = 0
    counts: list[list[int]] | None = None  # [W][W]: pairs sent from rank i to rank j, last forward

    def __deepcopy__(self, memo):
        # A copied model (e.g. an EMA copy) shares the group: process groups are handles, not state to copy.
        return dataclasses.replace(self, counts=copy.deepcopy(self.counts, memo))


def _mesh_and_group(mesh_or_group, device_type: str) -> tuple[DeviceMesh, dist.ProcessGroup]:
    if mesh_or_group is None:
        mesh_or_group = dist.group.WORLD
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ExpertParallelError(
                f"expert parallelism takes a 1-D mesh, got {mesh_or_group.ndim}-D {mesh_or_group.mesh_dim_names}: "
                "pass the expert-parallel dimension, e.g. mesh['ep']"
            )
        return mesh_or_group, mesh_or_group.get_group()
    return DeviceMesh.from_group(mesh_or_group, device_type), mesh_or_group


def parallelize_experts(model: torch.nn.Module, mesh_or_group=None) -> ParallelSummary:
    """Shard every experts module of `model` over an expert-parallel group, in place; return what was sharded.

    `mesh_or_group`: a 1-D `DeviceMesh`, a `ProcessGroup`, or None for the default group. Every rank of the
    group calls this on an identical model (same weights): rank r keeps experts [r·E/W, (r+1)·E/W) of each
    layer as a Shard(0) DTensor parameter and drops the rest. Raises `ExpertParallelError` when a layer's E is
    not a multiple of the group size, or when a layer cannot run on the fused op (nothing is changed then).
    See the module docstring for the forward, backward and compile behaviour.
    """
    if not dist.is_initialized():
        raise ExpertParallelError("torch.distributed is not initialized: call dist.init_process_group first")
    experts = [(name, m) for name, m in model.named_modules() if _is_interface_experts(m)]
    if not experts:
        raise ExpertParallelError(
            "no experts module found: parallelize_experts shards transformers' @use_experts_implementation experts"
        )
    device_type = experts[0][1].down_proj.device.type
    mesh, group = _mesh_and_group(mesh_or_group, device_type)
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    # Check every module before changing any, so that a refusal leaves the model as it was.
    activations = {}
    for name, m in experts:
        if isinstance(m.down_proj, DTensor):
            raise ExpertParallelError(f"{name} is already sharded: call parallelize_experts once per model")
        why = _why_not(m)
        if why is None:
            w1 = m.gate_up_proj if m.has_gate else m.up_proj
            try:
                activations[name] = capture_activation(_activation_fn(m), w1.shape[2] if m.is_transposed else w1.shape[1])
            except Reject as r:
                why = f"{r.reason.value}: {r.detail}"
        if why is not None:
            raise ExpertParallelError(f"{name} cannot run on moefuse's fused op: {why}")
        num_experts = m.down_proj.shape[0]
        if num_experts % world:
            raise ExpertParallelError(
                f"{name} has E={num_experts} experts, not a multiple of the expert-parallel group size "
                f"world={world}: choose a group size that divides {num_experts}"
            )

    summary = ParallelSummary(rank, world)
    for name, m in experts:
        local = m.down_proj.shape[0] // world
        lo = rank * local
        for pname, p in list(m.named_parameters(recurse=False)):
            shard = p.detach()[lo : lo + local].clone()
            setattr(m, pname, torch.nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False),
                                                 requires_grad=p.requires_grad))
        m._moefuse_activation = activations[name]
        m._moefuse_ep = _EPState(mesh, group, rank, world, local)
        m.__class__ = _parallel_class(type(m))
        summary.sharded[name] = (lo, local)
    log.info("%s", summary)
    return summary


class _ExpertParallel:
    """Mixed into a sharded experts module's class, before its own: the forward becomes `_ep_forward`."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return _ep_forward(self, hidden_states, top_k_index, top_k_weights)


@functools.cache
def _parallel_class(cls: type) -> type:
    # A subclass per experts class (as FSDP2's fully_shard does), so isinstance checks still hold.
    return type(f"ExpertParallel{cls.__name__}", (_ExpertParallel, cls), {})


def _local_weights(m):
    """(w1, w2, b1, b2) of this rank's experts as the op takes them, and the module view `_spec_key` reads."""
    view = SimpleNamespace(has_gate=m.has_gate, has_bias=m.has_bias, is_transposed=m.is_transposed,
                           _moefuse_activation=m._moefuse_activation, _moefuse_router=_ROUTER,
                           **{n: p.to_local() for n, p in m.named_parameters(recurse=False)})
    return _weights(view), view


@torch.compiler.disable  # the split sizes are host ints: traced, they would specialise the graph per batch
def _ep_forward(m, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x[T,H], ids[T,K] (global expert ids), weights[T,K] → y[T,H] in x's dtype, as the unsharded layer."""
    st: _EPState = m._moefuse_ep
    (w1, w2, b1, b2), view = _local_weights(m)
    T, K = ids.shape
    flat = ids.reshape(-1)
    dest = flat // st.local_experts  # [S] int64: the rank owning each pair's expert
    order = torch.argsort(dest, stable=True)  # pairs grouped by destination, in pair order within each rank

    # Counts: index_add rather than bincount, which syncs on CUDA; then the layer's one host read.
    send = dest.new_zeros(st.world).index_add_(0, dest, torch.ones_like(dest))
    counts = _all_gather(send, 0, st.group).view(st.world, st.world).tolist()
    send_sizes = counts[st.rank]
    recv_sizes = [row[st.rank] for row in counts]
    st.counts, st.calls = counts, st.calls + 1

    # Dispatch: one row per pair; the ids travel as local expert ids.
    local_ids = funcol.all_to_all_single(flat[order] - dest[order] * st.local_experts, recv_sizes, send_sizes,
                                         st.group)
    x_recv = funcol.all_to_all_single_autograd(x[order // K].to(w1.dtype), recv_sizes, send_sizes, st.group)

    # Local experts: K=1, unit weights (the routing weight is applied at home).
    y_recv = fused_moe(x_recv, local_ids.view(-1, 1), x_recv.new_ones(x_recv.shape[0], 1), w1, w2, b1, b2,
                       _spec_key(view, x_recv.dtype, 1))

    # Return and combine in fp32, in pair order.
    y_sorted = funcol.all_to_all_single_autograd(y_recv, send_sizes, recv_sizes, st.group)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y_pairs = y_sorted[inverse].float().view(T, K, -1)
    return (y_pairs * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


def stats(model: torch.nn.Module) -> dict[str, LayerStats]:
    """Per sharded experts module (by path): its traffic in the last forward, as this rank saw it."""
    out = {}
    for name, m in model.named_modules():
        st = getattr(m, "_moefuse_ep", None)
        if st is None or st.counts is None:
            continue
        out[name] = LayerStats(rank=st.rank, sent=list(st.counts[st.rank]),
                               received=[row[st.rank] for row in st.counts],
                               load=[sum(col) for col in zip(*st.counts)], calls=st.calls)
    return out
