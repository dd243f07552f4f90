"""moefuse-convert: round trips of saved tiny checkpoints through the fused op, and bad input refused untouched."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefuse.checkpoint import convert_checkpoint, load_converted
from moefuse.cli import main
from moefuse.runtime import op as moe_op
from moefuse.testing import rel_err, tiny_model

# The op's CPU path (TRITON_INTERPRET removed), fresh dynamo caches (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_path")

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]


def tree_hash(path: Path) -> str:
    """Names, sizes, modification times and bytes of every file under `path`."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(path)} {st.st_size} {st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def probe_ids(vocab=128):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (SRC directory written by save_pretrained, the original model's logits on probe_ids())."""
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        src = tmp_path_factory.mktemp(family)
        model.save_pretrained(src)
        with torch.no_grad():
            out[family] = (src, model(probe_ids()).logits)
    return out


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv] + ["--quiet"])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, saved, tmp_path, capsys):
    src, ref = saved[family]
    before = tree_hash(src)
    dst = tmp_path / "out"
    rc, io = run_cli([src, dst], capsys)
    assert rc == 0, io.err
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left beside it
    report = json.loads((dst / "moefuse.json").read_text())
    probe = report["probe"]
    assert probe["ok"] and probe["fused_calls"] == 2 and probe["rel_err"] <= 1e-4, probe
    assert [layer["module"] for layer in report["layers"]] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert "2 MoE layer(s)" in io.out

    # On disk: moefuse's names and layout (w1 [E, N1, H], w2 [E, H, I]), against SRC's own tensors
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as f, safe_open(str(src / "model.safetensors"), "pt") as s:
        assert f.metadata()["moefuse_layout"] == "1"
        w1, w2 = f.get_tensor("model.layers.1.mlp.experts.w1"), f.get_tensor("model.layers.1.mlp.experts.w2")
        assert w1.shape == (8, 64, 64) and w2.shape == (8, 64, 32) and w1.is_contiguous()
        if family == "mixtral":  # saved per expert (w1 = gate, w3 = up, w2 = down): stacked as [gate; up]
            p = "model.layers.1.block_sparse_moe.experts.5"
            assert torch.equal(w1[5], torch.cat([s.get_tensor(f"{p}.w1.weight"), s.get_tensor(f"{p}.w3.weight")]))
            assert torch.equal(w2[5], s.get_tensor(f"{p}.w2.weight"))
        elif family == "qwen3_moe":
            p = "model.layers.1.mlp.experts.5"
            assert torch.equal(w1[5], torch.cat([s.get_tensor(f"{p}.gate_proj.weight"),
                                                 s.get_tensor(f"{p}.up_proj.weight")]))
        else:  # GPT-OSS saves [E, in, out] stacked, gate/up interleaved: transposed, kept interleaved
            assert torch.equal(w1, s.get_tensor("model.layers.1.mlp.experts.gate_up_proj").transpose(1, 2))
            assert torch.equal(f.get_tensor("model.layers.1.mlp.experts.b2"),
                               s.get_tensor("model.layers.1.mlp.experts.down_proj_bias"))
            spec = json.loads(report["layers"][1]["spec"])
            assert spec["activation"]["slices"] == [[0, 2], [1, 2]] and spec["w1_bias"]
        assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in f.keys())

    # What users run: load_converted(DST) → the fused op, with the original model's logits
    model = load_converted(dst)
    calls = moe_op.counters["cpu"]
    with torch.no_grad():
        out = model(probe_ids()).logits
    assert moe_op.counters["cpu"] - calls == 2
    assert rel_err(out, ref) <= 1e-4


def test_sharded_source_to_sharded_float16(tmp_path):
    """An index + shards in, fp16 shards + index out; the probe runs at fp16's tolerance."""
    src = tmp_path / "src"
    model = tiny_model("qwen3_moe", seed=1)
    model.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    before = tree_hash(src)
    report = convert_checkpoint(src, tmp_path / "dst", dtype="float16", max_shard_bytes=100_000, progress=False)
    assert tree_hash(src) == before
    assert report["dtype"] == "float16" and len(report["files"]) > 1 and report["probe"]["ok"]
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["files"])
    converted = load_converted(tmp_path / "dst")
    assert converted.dtype == torch.float16
    with torch.no_grad():
        exact = model(probe_ids()).logits  # fp32: the reference both fp16 runs are measured against
        eager = model.half()(probe_ids()).logits
        calls = moe_op.counters["cpu"]
        out = converted(probe_ids()).logits
    assert moe_op.counters["cpu"] - calls == 2
    # A derived bound, not a picked one: fp16 rounding costs eager some error against fp32 (about 1e-2 here,
    # and it varies by machine); the fused op rounds at other points, so may cost up to twice that, plus a
    # few fp16 ulps of the largest logit (rel_err is relative to it).
    assert rel_err(out, exact) <= 2 * rel_err(eager, exact) + 4 * torch.finfo(torch.float16).eps


def test_converted_checkpoint_compiles_to_one_fused_node_per_layer(saved, tmp_path):
    from moefuse import Backend

    src, ref = saved["mixtral"]
    convert_checkpoint(src, tmp_path / "dst", verify=False, progress=False)
    backend = Backend({"inner": "eager"})
    with torch.no_grad():
        model = load_converted(tmp_path / "dst", allow_unverified=True)  # converted with verify=False
        out = torch.compile(model, backend=backend)(probe_ids()).logits
    lowered = backend.explanation.lowered
    assert len(lowered) == 2 and all(r.by_convert for r in lowered), str(backend.explanation)
    assert rel_err(out, ref) <= 1e-4


def test_tied_embeddings_are_stored_once(tmp_path):
    """Ernie4.5-MoE ties lm_head to the embeddings: one tensor on disk, tied again on load."""
    model = tiny_model("ernie4_5_moe")
    model.save_pretrained(tmp_path / "src")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    assert report["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and report["probe"]["ok"]
    converted = load_converted(tmp_path / "dst")
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    with torch.no_grad():
        assert rel_err(converted(probe_ids()).logits, model(probe_ids()).logits) <= 1e-4


# ------------------------------------------------------------------------------------------ bad input

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _dense_model(d: Path):
    import transformers

    dense = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(d)


BAD = {  # name → (how SRC is spoiled, error in the message)
    "missing_dir": (shutil.rmtree, "does not exist"),
    "no_config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "corrupt_config": (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    "config_without_model_type": (lambda d: (d / "config.json").write_text("{}"), "no 'model_type'"),
    "unknown_model_type": (lambda d: _edit_config(d, model_type="no_such_model"), "does not know model_type"),
    "no_safetensors": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "no *.safetensors"),
    "truncated_safetensors": (_truncate, "cannot be read"),
    "garbage_safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 64), "cannot be read"),
    "corrupt_index": (lambda d: (d / "model.safetensors.index.json").write_text("[]"), "not a safetensors index"),
    "shape_mismatch": (lambda d: _edit_config(d, moe_intermediate_size=48), "do not match its config.json"),
    "layer_count_mismatch": (lambda d: _edit_config(d, num_hidden_layers=1), "unexpected keys"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_source_is_refused_untouched(case, saved, tmp_path, capsys):
    src = _copy(saved["qwen3_moe"][0], tmp_path / "src")
    spoil, message = BAD[case]
    spoil(src)
    before = tree_hash(src) if src.exists() else None
    dst = tmp_path / "dst"
    rc, io = run_cli([src, dst], capsys)
    assert rc == 2, io.err
    assert message in io.err and "hint:" in io.err, io.err
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in tmp_path.iterdir())
    assert (tree_hash(src) if src.exists() else None) == before


def test_model_without_moe_layers_is_unsupported(tmp_path, capsys):
    src = tmp_path / "llama"
    _dense_model(src)
    rc, io = run_cli([src, tmp_path / "dst"], capsys)
    assert rc == 2 and "no MoE experts module" in io.err, io.err
    assert not (tmp_path / "dst").exists()


def test_existing_destination_is_never_overwritten(saved, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, io = run_cli([saved["mixtral"][0], dst], capsys)
    assert rc == 2 and "exists already" in io.err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where, message", [("inside_src", "lies inside the source"),
                                             ("no_parent", "parent directory of")])
def test_bad_destination_is_refused(where, message, saved, tmp_path, capsys):
    src = saved["mixtral"][0]
    before = tree_hash(src)
    dst = src / "converted" if where == "inside_src" else tmp_path / "missing" / "dst"
    rc, io = run_cli([src, dst], capsys)
    assert rc == 2 and message in io.err, io.err
    assert not dst.exists() and tree_hash(src) == before


def test_probe_mismatch_exits_1_and_writes_nothing(saved, tmp_path, capsys, monkeypatch):
    """A layout bug (gate and up halves swapped in w1) is what the probe exists to catch."""
    import moefuse.checkpoint as ckpt

    real = ckpt._converted_tensors

    def swapped(model):
        tensors, tied, layers = real(model)
        w1 = tensors["model.layers.0.mlp.experts.w1"]
        tensors["model.layers.0.mlp.experts.w1"] = torch.cat(w1.chunk(2, dim=1)[::-1], dim=1)
        return tensors, tied, layers

    monkeypatch.setattr(ckpt, "_converted_tensors", swapped)
    src = saved["qwen3_moe"][0]
    before = tree_hash(src)
    rc, io = run_cli([src, tmp_path / "dst"], capsys)
    assert rc == 1 and "does not match the original" in io.err, io.err
    assert not (tmp_path / "dst").exists() and list(tmp_path.iterdir()) == []
    assert tree_hash(src) == before


def test_load_converted_refuses_a_plain_checkpoint(saved):
    from moefuse.checkpoint import NotConverted

    with pytest.raises(NotConverted, match="moefuse-convert SRC_DIR DST_DIR"):
        load_converted(saved["mixtral"][0])


def test_console_entry_runs_as_a_subprocess(saved, tmp_path):
    """`python -m moefuse.cli` (what the moefuse-convert console script calls): exit status and output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src, dst = saved["mixtral"][0], tmp_path / "dst"
    done = subprocess.run([sys.executable, "-m", "moefuse.cli", str(src), str(dst), "--no-verify"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "writing tensors" in done.stderr and "probe: skipped" in done.stdout
    assert json.loads((dst / "moefuse.json").read_text())["probe"] is None
