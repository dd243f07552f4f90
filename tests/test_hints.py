"""Every hint that names a fix is true: `moefuse.explain` checks `moefuse.convert` against the model before its
report suggests it, and applying the suggested fix lowers the layer."""
from __future__ import annotations

import pytest
import torch

import forms
import moefuse
from moefuse.metrics import rel_err
from test_convert_structure import RenamedMoE, build

pytestmark = pytest.mark.usefixtures("cpu_path")


def test_unrecognised_layer_hint_names_convert_and_convert_works():
    """A layer detection does not lower in the graph (every expert on every token, biased GELU experts in a
    ModuleDict, K only in a config object): the report says so, its hint says convert converts the module, and
    after convert the compiled model runs the fused op with eager's numbers."""
    model, x = build("renamed_cfg_k")
    with torch.no_grad():
        ref = model(x)
        explanation = moefuse.explain(model, x)
    assert not explanation.lowered
    rejected = [r for r in explanation.rejected if r.reason.name == "UNSUPPORTED_FORM"]
    assert rejected, str(explanation)
    assert all("moefuse.convert(model) converts" in r.hint for r in rejected), str(explanation)
    summary = moefuse.convert(model)  # the fix the hint names
    assert summary.converted, str(summary)
    with torch.no_grad():
        fixed = moefuse.explain(model, x)
        out = torch.compile(model, backend=moefuse.Backend({"inner": "eager"}))(x)
    assert len(fixed.lowered) == 2 and all(r.by_convert for r in fixed.lowered), str(fixed)
    assert rel_err(out, ref) <= 1e-4


def test_hint_says_why_convert_would_not_apply():
    """The same layer passed as the model itself: convert has no parent to swap it into, and the hint says that
    rather than suggesting it."""
    torch.manual_seed(0)
    with torch.no_grad():
        explanation = moefuse.explain(RenamedMoE(), torch.randn(7, 32))
    rejected = [r for r in explanation.rejected if r.reason.name == "UNSUPPORTED_FORM"]
    assert rejected and rejected[0].hint.startswith("moefuse.convert(model) does not convert it"), str(explanation)


def test_hint_does_not_name_convert_when_convert_would_not_apply():
    """A capacity layer: its hint says nothing of convert; a layer moefuse does not know at all gets the dry
    run's true answer instead of "convert may apply"."""
    torch.manual_seed(0)
    model = forms.CapacityMoE()
    with torch.no_grad():
        explanation = moefuse.explain(model, torch.randn(16, 64))
    assert {r.reason.name for r in explanation.rejected} == {"CAPACITY"}, str(explanation)
    assert "convert" not in str(explanation)
