"""moefuse.parallel: expert parallelism (EP) on torch.distributed — MoE layers whose experts outgrow one device.

    dist.init_process_group("gloo")                     # or "nccl"; one process per device
    moefuse.parallelize_experts(model, mesh)            # a 1-D DeviceMesh or a ProcessGroup (default: WORLD)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True   # one graph (see torch.compile below)
    compiled = torch.compile(model, backend="moefuse")
    print(moefuse.parallel.stats(model))                # per layer: rows and pairs sent/received, load, imbalance

Layout. Every experts module moefuse can run (transformers' `@use_experts_implementation` experts, and the
`FusedExperts` that `moefuse.convert` swaps in for DBRX, JetMoE, Switch and user ModuleList MoEs: convert
first, then parallelize) keeps, on rank r of an EP group of size W, the contiguous block of experts
[r·E/W, (r+1)·E/W); E % W != 0 is refused (`ExpertParallelError`, naming E and W; nothing is changed). Each
of its parameters (gate_up_proj / up_proj, down_proj, their biases; FusedExperts' w1, w2, b1, b2) becomes a
DTensor of global shape [E, …] placed `Shard(0)` on the 1-D mesh, so `state_dict()` holds the global
layout: `torch.distributed.checkpoint` saves and loads each rank's block as it is, and the same checkpoint
loads into the unsharded model (or another W). Everything else — attention, norms, embeddings, the router,
shared experts — stays an ordinary replicated tensor.

Forward of one layer, on every rank, with its own tokens x[T,H] and their routing (ids, weights)[T,K]:
  1. route locally: the router stays in the model, replicated; pair p = t·K + k goes to rank ids[p] // (E/W)
     (an id outside [0, E), e.g. Switch's capacity drops, is a dropped pair: sent nowhere, output 0);
  2. exchange counts: one all-gather of each rank's [2, W] send counts (rows, pairs) gives the whole group's
     counts, read on the host once — the split sizes every all-to-all needs. This is the layer's only host
     sync (on a GPU a stream sync per layer per forward; the backward reads the saved CPU copy and needs none);
  3. dispatch: one row per token and destination rank — a token whose k experts sit on one rank is sent once,
     not k times — by all-to-all, and beside it, per pair, its expert's local id, whether it starts a row, and
     its routing weight (one [pairs, 3] int32 all-to-all, the weight as fp32 bits: exact for fp32, bf16 and
     fp16 weights);
  4. the received rows and pairs are flat pairs (`moefuse.runtime.pairs`): the local experts run as one
     fused-op call (`moefuse::moe_pairs_fwd` when gradients are needed, `moefuse::moe_pairs` otherwise) that
     returns each row's weighted partial sum Σ_{its pairs} w·expert(x) — possibly on no rows at all;
  5. all-to-all the partial sums back (again one row per token and rank), and add them at home in fp32.
Traffic per layer, rows R ≤ pairs S = T·K (R = S only when no two of a token's experts share a rank):
forward R·H out + 12 bytes a pair, R·H back; backward R·H out, R·H back + one weight gradient a pair. One
row per pair each way (S·H) would be the alternative that keeps the weights at home; sending them is what
lets the partial sums come back already combined. `stats` gives rows and pairs per layer. Measured rows /
pairs on tiny models' routing (random weights, a [8, 32] batch): Qwen3-MoE E=8 K=2 0.78 at W=2, 0.94 at
W=4; DeepSeek-V3 E=8 K=2 (group-limited, a group per rank) 0.50 at W=2; Qwen3-MoE E=64 K=8 0.25 / 0.45 /
0.68 and DeepSeek-V3 E=64 K=8 (8 groups, top 4) 0.25 / 0.39 / 0.50 at W=2 / 4 / 8. Dropless and
exact: no capacity factor; every pair is computed once by its owner; in fp32 the result differs from the
single-process layer only by the order of the sum.

Backward (`moefuse::ep_moe_bwd`) mirrors the forward: y[t] is the sum of its rows' partial sums, so each row's
gradient is dy[t]: all-to-all it to the owners; the fused op's backward (`moefuse::moe_pairs_bwd`) on the
rows each owner ran gives dx per row, the expert gradients and, per pair, the routing weight's gradient
⟨dy[t], Y_pair⟩ (from h, without Y); dx and the weight gradients all-to-all home, where dx is summed over a
token's rows and the weight gradients flow on into the router, which stays on its rank. Saved for it: at
home the rows' tokens [R] and the pair order [T·K]; at the owner the received rows [R', H], their flat pairs
and the fused op's h [P', N1] (P' pairs received) — nothing [T·K, H]. Expert weight gradients stay on the
owner rank (a DTensor grad, Shard(0)) and already sum every rank's tokens. Replicated parameters (router,
shared experts, attention, embeddings) get this rank's tokens' gradient only: reduce them over the group as
for any data-parallel parameter (all-reduce, DDP, or FSDP2 as below). Every rank must run every forward and
backward (the collectives pair up across ranks), even a rank without tokens.

Composition with FSDP2 on a 2-D mesh (dp × ep): `parallelize_experts(model, mesh["ep"])`, then
`fully_shard(block, mesh=mesh, ignored_params=<the expert DTensors>)` on each decoder layer and the model
(HSDP: replicated over "dp", sharded over "ep"); FSDP2 then reduces the non-expert gradients over all ranks,
and the caller all-reduces the expert gradients over mesh["dp"] (each expert block is replicated there). On
gloo (no PREMUL_SUM) call `set_force_sum_reduction_for_comms(True)` on each FSDP module. Tested on CPU.

torch.compile: steps 2–5 are one opaque custom op per layer, `moefuse::ep_moe`, so the host read of the split
sizes happens inside it and never specialises a graph on a batch's routing. The only data-dependent sizes a
graph sees are the rows and pairs this rank sent and received (unbacked sizes in the op's fake). Dynamo captures
such ops only with `torch._dynamo.config.capture_dynamic_output_shape_ops = True`: set it and a parallelized
model compiles into one graph (forward and backward; one compile serves every routing); without it each
layer's op is a graph break and the rest still compiles around it. moefuse's backend passes the op through
untouched; its report lists each such layer ("expert parallel: world W, experts [a, b) local"), `stats` its
traffic.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moefuse.conversion import (FusedExperts, activation_fn, expert_weights, is_interface_experts, spec_key,
                                why_not)
from moefuse.errors import MoefuseError
from moefuse.passes.assemble import capture_activation
from moefuse.passes.region import Reject
from moefuse.runtime import pairs as _pairs_ops  # noqa: F401  (registers moefuse::moe_pairs / _fwd / _bwd)
from moefuse.spec import spec_from_key

log = logging.getLogger("moefuse.parallel")

_ROUTER = "the model's own, replicated; rows dispatched by all-to-all (moefuse.parallelize_experts)"
Tensor = torch.Tensor

__all__ = ["ExpertParallelError", "ExpertParallelFusedExperts", "LayerStats", "ParallelSummary", "parallelize_experts",
           "stats"]


class ExpertParallelError(MoefuseError, ValueError):
    """A model or group that expert parallelism cannot shard as asked."""


@dataclass
class LayerStats:
    """One layer's traffic in its last forward, as this rank saw it. Pairs are (token, expert) pairs; rows are
    token rows on the wire: one per token and destination rank, however many of its experts that rank holds."""

    rank: int
    sent: list[int]  # [W]: pairs this rank sent to each rank (its own included)
    received: list[int]  # [W]: pairs this rank's experts received from each rank
    load: list[int]  # [W]: pairs each rank's experts ran (the column sums of the group's count matrix)
    calls: int  # forwards run so far
    rows_sent: list[int] = field(default_factory=list)  # [W]: token rows this rank sent to each rank
    rows_received: list[int] = field(default_factory=list)  # [W]: token rows received from each rank

    @property
    def imbalance(self) -> float:
        """max / mean of `load`: 1.0 when every rank's experts ran as many pairs; W when one rank ran all."""
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean else 1.0

    def __str__(self) -> str:
        return (f"rank {self.rank}: sent {sum(self.sent)} pairs in {sum(self.rows_sent)} rows {self.rows_sent}, "
                f"received {sum(self.received)} pairs in {sum(self.rows_received)} rows {self.rows_received}, "
                f"load per rank {self.load} pairs, imbalance {self.imbalance:.2f}, calls {self.calls}")


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
    group: dist.ProcessGroup
    spec: str  # the local experts' MoESpec key (E/W experts, K=1)
    dtype: torch.dtype  # the experts' dtype when sharded (the spec's)
    key: str  # this layer's entry in the traffic record

    def __deepcopy__(self, memo):
        # A copied model (e.g. an EMA copy) shares the group (a handle, not state) and records its own traffic.
        return dataclasses.replace(self, key=str(next(_KEYS)))


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
    layer as a Shard(0) DTensor parameter and drops the rest. The experts modules are transformers'
    `@use_experts_implementation` experts and the `FusedExperts` modules `moefuse.convert` swapped in (DBRX,
    JetMoE, Switch, user ModuleList MoEs: convert first, then parallelize). Raises `ExpertParallelError` when
    a layer's E is not a multiple of the group size, or when a layer cannot run on the fused op (nothing is
    changed then). See the module docstring for the forward, backward and compile behaviour.
    """
    if not dist.is_initialized():
        raise ExpertParallelError("torch.distributed is not initialized: call dist.init_process_group first")
    experts = [(name, m) for name, m in model.named_modules()
               if is_interface_experts(m) or isinstance(m, FusedExperts)]
    if not experts:
        raise ExpertParallelError(
            "no experts module found: parallelize_experts shards transformers' @use_experts_implementation "
            "experts and moefuse.convert's FusedExperts (run moefuse.convert(model) first for other MoE forms)"
        )
    device_type = expert_weights(experts[0][1])[1].device.type
    mesh, group = _mesh_and_group(mesh_or_group, device_type)
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    # Check every module before changing any, so that a refusal leaves the model as it was.
    activations = {}
    for name, m in experts:
        w1 = expert_weights(m)[0]  # [E, N1, H] (a view for transposed storage)
        if isinstance(w1, DTensor):
            raise ExpertParallelError(f"{name} is already sharded: call parallelize_experts once per model")
        why = None if isinstance(m, FusedExperts) else why_not(m)  # convert checked its own modules
        if why is None:
            try:
                activations[name] = getattr(m, "_moefuse_activation", None)
                if activations[name] is None:
                    activations[name] = capture_activation(activation_fn(m), w1.shape[1])
            except Reject as r:
                why = f"{r.reason.value}: {r.detail}"
        if why is not None:
            raise ExpertParallelError(f"{name} cannot run on moefuse's fused op: {why}")
        if w1.shape[0] % world:
            raise ExpertParallelError(
                f"{name} has E={w1.shape[0]} experts, not a multiple of the expert-parallel group size "
                f"world={world}: choose a group size that divides {w1.shape[0]}"
            )

    summary = ParallelSummary(rank, world)
    for name, m in experts:
        local = expert_weights(m)[0].shape[0] // world
        lo = rank * local
        for pname, p in list(m.named_parameters(recurse=False)):  # every one is [E, …]
            shard = p.detach()[lo : lo + local].clone()
            setattr(m, pname, torch.nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False),
                                                 requires_grad=p.requires_grad))
        m._moefuse_activation = activations[name]
        w1, w2, b1, b2 = (None if t is None else t.to_local() for t in expert_weights(m))
        # The local experts' spec, through convert's `spec_key` on a stand-in holding them in the op's layout.
        view = SimpleNamespace(has_gate=True, has_bias=True, is_transposed=False, gate_up_proj=w1, down_proj=w2,
                               gate_up_proj_bias=b1, down_proj_bias=b2, _moefuse_activation=activations[name],
                               _moefuse_router=_ROUTER)
        m._moefuse_ep = _EPState(group, spec_key(view, w1.dtype, 1), w1.dtype, str(next(_KEYS)))
        m.__class__ = _parallel_class(type(m))
        summary.sharded[name] = (lo, local)
    log.info("%s", summary)
    return summary


class _ExpertParallel:
    """Mixed into a sharded experts module's class, before its own: the forward runs `moefuse::ep_moe`."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """x[T,H], ids[T,K] (global expert ids), weights[T,K] → y[T,H] in x's dtype, as the unsharded layer."""
        st: _EPState = self._moefuse_ep
        w1, w2, b1, b2 = (None if t is None else t.to_local() for t in expert_weights(self))
        if w1.dtype != st.dtype:
            raise ExpertParallelError(f"the experts were sharded in {st.dtype} and are now {w1.dtype}: "
                                      "cast the model before parallelize_experts, not after")
        differentiable = (hidden_states, top_k_weights, w1, w2, b1, b2)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
        y, *_ = torch.ops.moefuse.ep_moe(hidden_states.to(w1.dtype), top_k_index, top_k_weights, w1, w2, b1, b2,
                                         st.spec, st.group.group_name, st.key, save)
        return y.to(hidden_states.dtype)


class ExpertParallelFusedExperts(_ExpertParallel, FusedExperts):
    """A sharded `FusedExperts` (`moefuse.convert`'s stacked experts): forward(x [T, H], ids [T, K], weights
    [T, K]) → y [T, H] through `moefuse::ep_moe`. convert's subclasses (DBRX's, Switch's) adapt their model's
    call and then call `FusedExperts.forward`: this class takes its place below them (see `_parallel_class`)."""

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            raise ExpertParallelError(
                f"these experts were converted from modules applying dropout p={self.dropout} in training; the "
                "fused op does not: set the model's dropout to 0 before moefuse.convert to train it converted"
            )
        return super().forward(x, top_k_index, top_k_weights)


@functools.cache
def _parallel_class(cls: type) -> type:
    # A subclass per experts class (as FSDP2's fully_shard does), so isinstance checks still hold.
    if cls is FusedExperts:
        return ExpertParallelFusedExperts
    if issubclass(cls, FusedExperts):  # its forward calls FusedExperts.forward: EP's comes after it (MRO)
        return type(f"ExpertParallel{cls.__name__}", (cls, ExpertParallelFusedExperts), {})
    return type(f"ExpertParallel{cls.__name__}", (_ExpertParallel, cls), {})


# ---------------------------------------------------------------------------------------------------------
# moefuse::ep_moe — one opaque op per layer: exchange, dispatch, local experts, return, combine
# ---------------------------------------------------------------------------------------------------------
# The op is opaque to dynamo (a custom op with a fake), so a parallelized model compiles into one graph: the
# host read of the split sizes happens inside it, where no graph sees a data-dependent size except the row and
# pair counts, which the fake gives as unbacked sizes.


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def _all_to_all(rows: Tensor, out_sizes: list[int], in_sizes: list[int], group) -> Tensor:
    out = rows.new_empty((sum(out_sizes), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=group)
    return out


def _splits(counts: Tensor, rank: int, kind: int) -> tuple[list[int], list[int]]:
    """(sent to each rank, received from each rank) by this rank, from counts [W src, 2, W dst] on the CPU;
    kind 0: rows, 1: pairs."""
    sizes = counts[:, kind].tolist()
    return sizes[rank], [row[rank] for row in sizes]


@torch.library.custom_op("moefuse::ep_moe", mutates_args=())
def ep_moe(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None,
    b2: Tensor | None, spec: str, group_name: str, layer: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One expert-parallel MoE layer on this rank. x[T,H] in the experts' dtype, topk_ids[T,K] global expert
    ids (outside [0, E): a dropped pair, sent nowhere), topk_weights[T,K]; w1/w2/b1/b2 this rank's E/W
    experts; `spec` their MoESpec key.

    Returns y[T,H] and what the backward needs. Home side: send_token[Ns] (the token of each row sent, by
    destination rank then token), order[T·K] (pairs by destination rank, token, k; dropped pairs last).
    Owner side: x_recv[N,H] (the N rows received), pair_token[P] / pair_expert[P] int32 and pair_weight[P]
    (the P received pairs as flat pairs over those rows), token_offsets[N+1] int32, h (the fused op's
    pre-activation, [P,N1]; empty unless `save`). counts[W,2,W] int64 on the CPU: rows (1: pairs) from rank i
    to rank j, the split sizes."""
    if spec_from_key(spec).w3:
        raise ExpertParallelError(
            "expert parallelism does not take layers whose gate and up are two tensors (MoESpec.w3): moefuse::ep_moe "
            "shards and exchanges w1, w2 and the biases only; run the layer unsharded (moefuse::moe with w3), or hold "
            "gate and up as one [E, 2·I, H] tensor")
    group = _group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local_experts = w1.shape[0]
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < local_experts * world)
    dest = torch.where(valid, flat // local_experts, world)  # [S]: the rank owning each pair; world: nowhere
    order = torch.argsort(dest, stable=True)  # by destination, then token, then k
    dest_sorted, token_sorted = dest[order], order // K
    # A pair starts a row when its (destination, token) differs from the previous pair's: one row per token
    # and destination rank, however many of the token's experts that rank holds.
    first = torch.ones_like(dest_sorted, dtype=torch.bool)
    first[1:] = (dest_sorted[1:] != dest_sorted[:-1]) | (token_sorted[1:] != token_sorted[:-1])

    # Counts: index_add, not bincount (which syncs on CUDA), then the layer's one host read.
    send = dest.new_zeros(2, world + 1)
    send[0].index_add_(0, dest_sorted, first.long())
    send[1].index_add_(0, dest_sorted, torch.ones_like(dest_sorted))
    gathered = [torch.empty_like(send[:, :world]) for _ in range(world)]
    dist.all_gather(gathered, send[:, :world].contiguous(), group=group)
    counts = torch.stack(gathered).cpu()
    (send_rows, recv_rows), (send_pairs, recv_pairs) = _splits(counts, rank, 0), _splits(counts, rank, 1)
    _record(layer, rank, counts.tolist())

    # Dispatch each row once, and per pair (its expert's local id, whether it starts a row, its weight's fp32
    # bits): one int32 message instead of three all-to-alls.
    row = torch.cumsum(first, 0) - 1  # [S]: the row of each sorted pair; the same token within a row
    send_token = token_sorted.new_empty(T * K).scatter_(0, row, token_sorted)[: sum(send_rows)]
    meta = torch.stack([(flat[order] - dest_sorted * local_experts).int(), first.int(),
                        topk_weights.reshape(-1)[order].float().view(torch.int32)], 1)[: sum(send_pairs)]
    x_recv = _all_to_all(x[send_token], recv_rows, send_rows, group)
    meta_recv = _all_to_all(meta, recv_pairs, send_pairs, group)

    # The received rows and pairs are flat pairs (rows in order, each row's pairs contiguous).
    pair_token = (torch.cumsum(meta_recv[:, 1], 0) - 1).int()
    pair_expert = meta_recv[:, 0].clone()  # clones, not views: an op's outputs must not alias each other
    pair_weight = meta_recv[:, 2].clone().view(torch.float32).to(topk_weights.dtype)
    token_offsets = torch.searchsorted(pair_token, torch.arange(x_recv.shape[0] + 1, dtype=torch.int32,
                                                                device=x.device), out_int32=True)
    pairs = (x_recv, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, spec)
    if save:
        y_recv, h = torch.ops.moefuse.moe_pairs_fwd(*pairs)
    else:
        y_recv, h = torch.ops.moefuse.moe_pairs(*pairs), x.new_empty(0)

    # Each row comes back as its weighted partial sum; home adds a token's partial sums in fp32.
    y_rows = _all_to_all(y_recv, send_rows, recv_rows, group)
    y = y_rows.new_zeros((T, x.shape[1]), dtype=torch.float32).index_add_(0, send_token, y_rows.float())
    return y.to(x.dtype), send_token, order, x_recv, pair_token, pair_expert, pair_weight, token_offsets, h, counts


@ep_moe.register_fake
def _ep_moe_fake(x, topk_ids, topk_weights, w1, w2, b1, b2, spec, group_name, layer, save):
    T, K = topk_ids.shape
    ctx = torch.library.get_ctx()
    sent, rows, pairs = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    world = dist.get_world_size(_group(group_name))
    h = x.new_empty((pairs, w1.shape[1])) if save else x.new_empty(0)
    ids = topk_ids.new_empty(pairs, dtype=torch.int32)
    return (x.new_empty(x.shape), topk_ids.new_empty(sent, dtype=torch.int64),
            topk_ids.new_empty(T * K, dtype=torch.int64), x.new_empty((rows, x.shape[1])), ids,
            ids.new_empty(pairs), topk_weights.new_empty(pairs), ids.new_empty(rows + 1), h,
            torch.empty((world, 2, world), dtype=torch.int64))


@torch.library.custom_op("moefuse::ep_moe_bwd", mutates_args=())
def ep_moe_bwd(
    dy: Tensor, topk_weights: Tensor, send_token: Tensor, order: Tensor, x_recv: Tensor, pair_token: Tensor,
    pair_expert: Tensor, pair_weight: Tensor, token_offsets: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None,
    b2: Tensor | None, h: Tensor, counts: Tensor, spec: str, group_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of `ep_moe`, the forward's exchanges in reverse: (dx[T,H], dtopk_weights[T,K], dw1, dw2,
    db1, db2) — the expert gradients for this rank's experts, from every rank's pairs; empty db without bias."""
    group = _group(group_name)
    rank = dist.get_rank(group)
    T, K = topk_weights.shape
    (send_rows, recv_rows), (send_pairs, recv_pairs) = _splits(counts, rank, 0), _splits(counts, rank, 1)  # no sync

    # y[t] is the sum of its rows' partial sums, so each row's gradient is dy[t]; the owners run the fused
    # backward on the rows they ran: dx per row, the routing weights' gradient per pair (⟨dy[t], Y_pair⟩).
    dy_recv = _all_to_all(dy[send_token], recv_rows, send_rows, group)
    dx_recv, dpair_weight, dw1, dw2, db1, db2, _ = torch.ops.moefuse.moe_pairs_bwd(
        dy_recv, x_recv, pair_token, pair_expert, pair_weight, token_offsets, w1, w2, b1, b2, h, spec)
    dx_rows = _all_to_all(dx_recv, send_rows, recv_rows, group)
    dpairs = _all_to_all(dpair_weight.to(topk_weights.dtype), send_pairs, recv_pairs, group)
    dx = dx_rows.new_zeros((T, dx_rows.shape[1]), dtype=torch.float32).index_add_(0, send_token, dx_rows.float())
    dweights = topk_weights.new_zeros(T * K)  # dropped pairs: no gradient
    dweights[order[: dpairs.shape[0]]] = dpairs
    return dx.to(dy.dtype), dweights.view(T, K), dw1, dw2, db1, db2


@ep_moe_bwd.register_fake
def _ep_moe_bwd_fake(dy, topk_weights, send_token, order, x_recv, pair_token, pair_expert, pair_weight,
                     token_offsets, w1, w2, b1, b2, h, counts, spec, group_name):
    return (dy.new_empty(dy.shape), topk_weights.new_empty(topk_weights.shape), w1.new_empty(w1.shape),
            w2.new_empty(w2.shape), b1.new_empty(b1.shape) if b1 is not None else dy.new_empty(0),
            b2.new_empty(b2.shape) if b2 is not None else dy.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, w1, w2, b1, b2, spec, group_name, layer, save = inputs
    _, *saved = output
    ctx.save_for_backward(topk_weights, w1, w2, b1, b2, *saved)
    ctx.spec, ctx.group_name = spec, group_name
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, dy, *_):
    topk_weights, w1, w2, b1, b2, send_token, order, x_recv, pair_token, pair_expert, pair_weight, token_offsets, \
        h, counts = ctx.saved_tensors
    dx, dweights, dw1, dw2, db1, db2 = torch.ops.moefuse.ep_moe_bwd(
        dy, topk_weights, send_token, order, x_recv, pair_token, pair_expert, pair_weight, token_offsets,
        w1, w2, b1, b2, h, counts, ctx.spec, ctx.group_name)
    return (dx, None, dweights, dw1, dw2, db1 if b1 is not None else None, db2 if b2 is not None else None,
            None, None, None, None)


torch.library.register_autograd("moefuse::ep_moe", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Traffic: recorded by the op (eager or compiled), read by `stats`
# ---------------------------------------------------------------------------------------------------------

_TRAFFIC: dict[str, tuple[int, list, int]] = {}  # layer key → (rank, counts [W src][rows, pairs][W dst], calls)
_KEYS = itertools.count()


def _record(layer: str, rank: int, counts: list[list[list[int]]]) -> None:
    calls = _TRAFFIC[layer][2] if layer in _TRAFFIC else 0
    _TRAFFIC[layer] = (rank, counts, calls + 1)


def stats(model: torch.nn.Module) -> dict[str, LayerStats]:
    """Per sharded experts module (by path): its traffic in the last forward, as this rank saw it."""
    out = {}
    for name, m in model.named_modules():
        st = getattr(m, "_moefuse_ep", None)
        if st is None or st.key not in _TRAFFIC:
            continue
        rank, counts, calls = _TRAFFIC[st.key]
        rows, pairs = [c[0] for c in counts], [c[1] for c in counts]
        out[name] = LayerStats(rank=rank, sent=list(pairs[rank]), received=[p[rank] for p in pairs],
                               load=[sum(col) for col in zip(*pairs)], calls=calls, rows_sent=list(rows[rank]),
                               rows_received=[r[rank] for r in rows])
    return out
