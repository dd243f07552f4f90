"""Training through the fused op: gradients of every parameter and a short AdamW run match eager."""
from __future__ import annotations

import pytest
import torch

from moefuse import Backend
from moefuse.runtime import op as moe_op
from moefuse.testing import num_moe_layers, rel_err, tiny_model

pytestmark = pytest.mark.usefixtures("cpu_path")


def loss_fn(model, ids):
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                           for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_gradients_match_eager(family):
    model = tiny_model(family).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = grads(model, ids)
    backend = Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    before = dict(moe_op.counters)
    loss, got = grads(compiled, ids)
    ran = {k: moe_op.counters[k] - before[k] for k in ("fwd_train_cpu", "bwd_cpu")}
    assert len(backend.explanation.lowered) == num_moe_layers(model) == 2, str(backend.explanation)
    assert ran == {"fwd_train_cpu": 2, "bwd_cpu": 2}  # the fused forward and its fused backward both ran
    assert rel_err(loss, ref_loss) <= 1e-5
    assert got.keys() == ref.keys()
    expert_params = [n for n in ref if "experts" in n]
    router_params = [n for n in ref if n.endswith(("gate.weight", "router.weight"))]
    assert expert_params and router_params  # the experts' and the router's gradients are among those checked
    worst = max(ref, key=lambda n: rel_err(got[n], ref[n]))
    assert rel_err(got[worst], ref[worst]) <= 1e-4, worst


def test_adamw_loss_curve_follows_eager():
    """20 AdamW steps of a tiny Qwen3-MoE compiled with moefuse track eager's losses step by step."""
    def run(compile_with):
        model = tiny_model("qwen3_moe", seed=3).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        step_fn = torch.compile(model, backend=compile_with) if compile_with else model
        gen = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(20):
            ids = torch.randint(0, 128, (4, 12), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(step_fn, ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    eager = run(None)
    backend = Backend({"inner": "eager"})
    fused = run(backend)
    assert backend.explanation.lowered
    assert eager[-1] < eager[0]  # it is learning, so the comparison means something
    worst = max(abs(a - b) / abs(a) for a, b in zip(fused, eager))
    assert worst <= 1e-3, (worst, eager, fused)


def test_no_grad_compiles_the_inference_op():
    model = tiny_model("olmoe")
    ids = torch.randint(0, 128, (1, 5))
    backend = Backend({"inner": "eager"})
    before = dict(moe_op.counters)
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    assert moe_op.counters["cpu"] - before["cpu"] == 2
    assert moe_op.counters["fwd_train_cpu"] == before["fwd_train_cpu"]  # no h computed or kept


@pytest.mark.slow
def test_inductor_traces_the_fused_backward():
    """The default inner compiler: AOTAutograd puts moefuse::moe_bwd in the backward graph, Inductor the rest."""
    model = tiny_model("qwen3_moe").train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = grads(model, ids)
    backend = Backend()
    before = dict(moe_op.counters)
    loss, got = grads(torch.compile(model, backend=backend), ids)
    assert moe_op.counters["bwd_cpu"] - before["bwd_cpu"] == 2
    assert all(r.training for r in backend.explanation.lowered) and len(backend.explanation.lowered) == 2
    assert "training: fused forward + backward" in str(backend.explanation)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4


def test_router_aux_loss_keeps_working():
    """The router stays in the graph: Mixtral's load-balancing loss (output_router_logits) trains as in eager."""
    model = tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.1).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(m):
        model.zero_grad(set_to_none=True)
        out = m(ids, labels=ids)
        out.loss.backward()
        return out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_aux, ref = run(model)
    backend = Backend({"inner": "eager"})
    aux, got = run(torch.compile(model, backend=backend))
    assert len(backend.explanation.lowered) == 2 and ref_aux > 0
    assert rel_err(aux, ref_aux) <= 1e-5
    router = [n for n in ref if n.endswith("gate.weight")]
    assert router and max(rel_err(got[n], ref[n]) for n in router) <= 1e-4


def test_router_jitter_noise_keeps_working():
    """Mixtral's router jitter (random scaling of the tokens in training) stays in the graph, before the region."""
    model = tiny_model("mixtral", router_jitter_noise=0.1).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(m):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same noise for both runs: the graph draws it in eager's order
        loss = loss_fn(m, ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = run(model)
    backend = Backend({"inner": "eager"})
    loss, got = run(torch.compile(model, backend=backend))
    assert len(backend.explanation.lowered) == 2 and all(r.training for r in backend.explanation.lowered)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4
