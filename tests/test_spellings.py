"""Every spelling of one MoE layer is lowered with eager's numbers (tests/spellings.py).

The cases cover each choice of every step at least once, in rotating combinations: three forms (sorted
rows + grouped mm, per-pair gathered weights, every expert on every token) × their product spellings ×
gate/up fused (chunk, slice) or separate × weights [E, in, out] or [E, out, in], with the sort, the counts,
the un-permute, the combine and where the routing weights multiply varying along. Each asserts the rewrite
fired (report and op counters) and the output equals eager; every third also compares every gradient.
grouped_mm compiles only in bf16 (its compile-time shape check), so that form runs in bf16 against an fp32
reference (moefuse within twice eager-bf16's error, plus one bf16 unit); the others in fp32 (1e-4 relative).
"""
from __future__ import annotations

import copy

import pytest
import torch

from moefuse import Backend
from moefuse.metrics import rel_err
from moefuse.runtime import op as moe_op
from spellings import COMBINES, COUNTS, GATE_UP, PRODUCTS, SORTS, UNPERMUTES, SpelledMoE, Spelling

pytestmark = pytest.mark.usefixtures("cpu_path")
BF16_UNIT = 2.0 ** -8


def _cases() -> list[Spelling]:
    cases = []
    for form, products in PRODUCTS.items():
        n = 0
        for product in products:
            for gate_up in GATE_UP:
                for in_out in (True, False):
                    cases.append(Spelling(form=form, product=product, sort=SORTS[n % len(SORTS)],
                                          count=COUNTS[n % len(COUNTS)], unpermute=UNPERMUTES[n % len(UNPERMUTES)],
                                          combine=COMBINES[n % len(COMBINES)], gate_up=gate_up, in_out=in_out,
                                          weights_first=n % 3 == 1))
                    n += 1
    return cases


CASES = _cases()




def _run(model, x, compiled, grad):
    x = x.detach().clone().requires_grad_(grad)
    explanation, calls = None, sum(moe_op.counters.values())
    with torch.set_grad_enabled(grad):
        if compiled:
            backend = Backend({"inner": "eager"})
            torch._dynamo.reset()
            out = torch.compile(model, backend=backend)(x)
            explanation = backend.explanation
        else:
            out = model(x)
    calls = sum(moe_op.counters.values()) - calls
    grads = {}
    if grad:
        params = dict(model.named_parameters())
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        gs = torch.autograd.grad((out.float() * probe).sum(), [x, *params.values()])
        grads = dict(zip(["x", *params], gs))
    return out, grads, explanation, calls


@pytest.mark.parametrize("spelling", CASES, ids=[str(c) for c in CASES])
def test_spelling_lowered_with_eager_numbers(spelling):
    grad = CASES.index(spelling) % 3 == 0
    torch.manual_seed(0)
    model = SpelledMoE(spelling)
    x = torch.randn(10, 32)
    if spelling.form == "grouped":
        reference, model = model, copy.deepcopy(model).bfloat16()
        ref, ref_grads, _, _ = _run(reference, x, False, grad)
        eager, eager_grads, _, _ = _run(model, x.bfloat16(), False, grad)
        out, grads, explanation, calls = _run(model, x.bfloat16(), True, grad)
        bound = {n: 2 * rel_err(eager_grads[n], ref_grads[n]) + BF16_UNIT for n in ref_grads}
        bound_out = 2 * rel_err(eager, ref) + BF16_UNIT
    else:
        ref, ref_grads, _, _ = _run(model, x, False, grad)
        out, grads, explanation, calls = _run(model, x, True, grad)
        bound, bound_out = dict.fromkeys(ref_grads, 1e-4), 1e-4
    assert len(explanation.lowered) == 1 and not explanation.rejected, str(explanation)
    assert calls >= 1
    assert explanation.lowered[0].spec.w3 == (spelling.gate_up == "separate")
    assert rel_err(out, ref) <= bound_out
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= bound[name], name
