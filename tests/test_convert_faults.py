"""moefuse-convert and load_converted under bad input and faults: typed errors (exit 2, one line, no traceback),
nothing half-written, nothing left behind once the next run succeeds, no silent load of an inconsistent folder.

Environment faults that cannot be produced honestly here are injected at the call that meets them: the tests
run as root (a read-only directory is writable to root) and /dev/full of this sandbox accepts writes, so a
read-only file system or a full disk is the `OSError` / `SafetensorError` that `mkdir` / safetensors raise
there. Killed runs are real: a subprocess kills itself with SIGKILL or SIGTERM at a chosen point.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moefuse.checkpoint as ckpt
from moefuse.checkpoint import TEMP_MARK, convert_checkpoint, load_converted
from moefuse.cli import main
from moefuse.errors import (AlreadyConverted, BadDevice, BadReport, CheckpointError, CorruptSafetensors,
                            MismatchedCheckpoint, NotConverted, UnverifiedCheckpoint)
from moefuse.testing import tiny_model

pytestmark = pytest.mark.usefixtures("cpu_path")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A saved tiny Qwen3-MoE checkpoint (config.json + model.safetensors)."""
    src = tmp_path_factory.mktemp("qwen3_moe")
    tiny_model("qwen3_moe").save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    """`source` converted, probe passed: copied by each test that spoils it."""
    dst = tmp_path_factory.mktemp("converted") / "dst"
    convert_checkpoint(source, dst, progress=False)
    return dst


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TEMP_MARK in p.name)


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv] + ["--quiet"])
    return rc, capsys.readouterr()


def assert_user_error(rc, io, message):
    """Exit 2, the one-line error (and its hint), no traceback."""
    assert rc == 2, io.err
    assert message in io.err, io.err
    assert "Traceback" not in io.err and "internal error" not in io.err, io.err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model is loaded: checks that must come first did not."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(ckpt, "_load_source", fail)


# --------------------------------------------------------------------------- devices and destinations

def test_unknown_device_is_refused_before_loading(source, tmp_path, capsys, no_loading):
    rc, io = run_cli([source, tmp_path / "dst", "--device", "banana"], capsys)
    assert_user_error(rc, io, "unknown device 'banana'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu_is_refused_before_loading(source, tmp_path, capsys, no_loading):
    rc, io = run_cli([source, tmp_path / "dst", "--device", "cuda"], capsys)
    assert_user_error(rc, io, "this machine has no cuda device")
    assert "--device cpu" in io.err and list(tmp_path.iterdir()) == []


def test_load_converted_refuses_an_unknown_device(converted):
    with pytest.raises(BadDevice, match="unknown device"):
        load_converted(converted, device="banana")


@pytest.mark.parametrize("code, message", [(errno.EROFS, "Read-only file system"),
                                           (errno.EACCES, "Permission denied"),
                                           (errno.ENOSPC, "No space left on device")])
def test_unwritable_destination_is_found_before_loading(code, message, source, tmp_path, capsys, monkeypatch,
                                                        no_loading):
    """The temporary folder is made first; mkdir's failure is the first thing a read-only or full file system
    (or a forbidden directory) says."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if TEMP_MARK in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    rc, io = run_cli([source, tmp_path / "dst", "--no-verify"], capsys)
    assert_user_error(rc, io, message)
    assert "hint:" in io.err and list(tmp_path.iterdir()) == []


FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("fault", ["safetensors_error", "oserror", "short_write"])
def test_full_disk_while_writing_is_one_line_and_leaves_nothing(fault, source, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if fault == "safetensors_error":  # what safetensors 0.8 raises for an I/O error
            raise SafetensorError(FULL_DISK)
        if fault == "oserror":
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), filename)
        real(tensors, filename, metadata=metadata)  # a file system that loses the end without saying so
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    rc, io = run_cli([source, tmp_path / "dst"], capsys)
    message = {"safetensors_error": "No space left on device", "oserror": "quota",
               "short_write": "was written incompletely"}[fault]
    assert_user_error(rc, io, message)
    assert list(tmp_path.iterdir()) == []


def test_oserror_outside_moefuse_checks_is_still_not_an_internal_error(source, tmp_path, capsys, monkeypatch):
    """An environment fault met where no check names it (here: reading SRC) is one line, exit 2."""
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt, "read_source", broken)
    rc, io = run_cli([source, tmp_path / "dst"], capsys)
    assert_user_error(rc, io, "Input/output error")


def test_non_positive_shard_size_is_refused(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(source), str(tmp_path / "dst"), "--max-shard-size", "-5"])
    assert exit_.value.code == 2 and "give 1 MiB or more" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="positive number of bytes"):
        convert_checkpoint(source, tmp_path / "dst", max_shard_bytes=0)
    assert list(tmp_path.iterdir()) == []


def test_result_has_the_sources_permissions(source, tmp_path):
    """mkdtemp's 0700 made converted folders unreadable to the others who can read SRC."""
    src = copy_dir(source, tmp_path / "src")
    for mode in (0o755, 0o750):
        src.chmod(mode)
        convert_checkpoint(src, tmp_path / f"dst{mode:o}", verify=False, progress=False)
        assert stat.S_IMODE((tmp_path / f"dst{mode:o}").stat().st_mode) == mode


# ---------------------------------------------------------------------------------------- bad sources

def test_converting_a_converted_folder_says_already_converted(converted, tmp_path, capsys):
    rc, io = run_cli([converted, tmp_path / "again"], capsys)
    assert_user_error(rc, io, "converted already")
    assert "load_converted" in io.err
    # moefuse.json removed: the tensors' own metadata still says so
    bare = copy_dir(converted, tmp_path / "bare")
    (bare / "moefuse.json").unlink()
    with pytest.raises(AlreadyConverted, match="moefuse's layout"):
        convert_checkpoint(bare, tmp_path / "again", progress=False)


def _rewrite_tensors(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_wrongly_shaped_expert_tensor_in_the_source(source, tmp_path, capsys):
    """transformers' stacking of per-expert tensors raised a RuntimeError: was exit 3 with a traceback."""
    src = copy_dir(source, tmp_path / "src")
    _rewrite_tensors(src, lambda s: s.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight",
                                                  torch.zeros(40, 64)))
    rc, io = run_cli([src, tmp_path / "dst"], capsys)
    assert_user_error(rc, io, "cannot assemble the tensors")
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_nan_in_the_source_weights_is_named(source, tmp_path, capsys):
    """Was: 'relative error nan … please report this'. The original's own logits are checked first."""
    src = copy_dir(source, tmp_path / "src")
    name = "model.layers.0.mlp.gate.weight"  # the router: every token's scores become NaN
    _rewrite_tensors(src, lambda state: state[name].__setitem__((0, 0), float("nan")))
    rc, io = run_cli([src, tmp_path / "dst"], capsys)
    assert_user_error(rc, io, "not finite")
    assert name in io.err and "please report" not in io.err, io.err


# ----------------------------------------------------------------------------- inconsistent converted folders

def _edit_report(d: Path, edit) -> None:
    report = json.loads((d / "moefuse.json").read_text())
    edit(report)
    (d / "moefuse.json").write_text(json.dumps(report))


def _edit_spec(field, value):
    def edit(report):
        spec = json.loads(report["layers"][1]["spec"])
        spec[field] = value
        report["layers"][1]["spec"] = json.dumps(spec)
    return edit


def _rename_tensor(d: Path) -> None:
    _rewrite_tensors(d, lambda s: s.__setitem__("model.layers.1.mlp.experts.w1_renamed",
                                                s.pop("model.layers.1.mlp.experts.w1")))


def _set_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


SPOILED = {  # name → (how the converted folder is spoiled, error type, error in the message)
    "renamed_tensor": (_rename_tensor, MismatchedCheckpoint, "which no file of"),
    "no_files": (lambda d: _edit_report(d, lambda r: r.pop("files")), BadReport, "has no 'files'"),
    "no_layers": (lambda d: _edit_report(d, lambda r: r.pop("layers")), BadReport, "has no 'layers'"),
    "no_tied": (lambda d: _edit_report(d, lambda r: r.pop("tied")), BadReport, "has no 'tied'"),
    "unknown_dtype": (lambda d: _edit_report(d, lambda r: r.update(dtype="float8")), BadReport, "'float8' is none of"),
    "garbled_spec": (lambda d: _edit_report(d, lambda r: r["layers"][0].update(spec="{E=8")), BadReport,
                     "layer spec in moefuse.json cannot be read"),
    "top_k_in_config": (_set_config(num_experts_per_tok=3), BadReport, "records top_k=2"),
    "top_k_in_report": (lambda d: _edit_report(d, _edit_spec("top_k", 3)), BadReport, "records top_k=3"),
    "hidden_in_report": (lambda d: _edit_report(d, _edit_spec("intermediate", 16)), BadReport,
                         "records intermediate=16"),
    "bias_in_report": (lambda d: _edit_report(d, _edit_spec("w1_bias", True)), BadReport, "records w1_bias=True"),
    "report_not_json": (lambda d: (d / "moefuse.json").write_text("{"), BadReport, "is not valid JSON"),
    "report_a_list": (lambda d: (d / "moefuse.json").write_text("[]"), NotConverted, "describes layout None"),
    "file_outside": (lambda d: _edit_report(d, lambda r: r.update(files=["../model.safetensors"])), BadReport,
                     "the folder's own *.safetensors"),
    "missing_file": (lambda d: (d / "model.safetensors").unlink(), CorruptSafetensors, "cannot be read"),
    "tied_to_nothing": (lambda d: _edit_report(d, lambda r: r.update(tied={"lm_head.weight": "nope"})),
                        MismatchedCheckpoint, "ties lm_head.weight to 'nope'"),
    "wrong_dtype_on_disk": (lambda d: _rewrite_tensors(d, lambda s: s.__setitem__(
        "model.layers.0.mlp.experts.w2", s["model.layers.0.mlp.experts.w2"].half())), MismatchedCheckpoint,
        "is float16 [8, 64, 32] on disk; the layer needs float32"),
    "probe_failed": (lambda d: _edit_report(d, lambda r: r["probe"].update(ok=False)), UnverifiedCheckpoint,
                     "probe failed"),
    "model_type": (lambda d: _edit_report(d, lambda r: r.update(model_type="mixtral")), BadReport,
                   "written for model_type 'mixtral'"),
}


@pytest.mark.parametrize("case", sorted(SPOILED))
def test_inconsistent_converted_folder_is_refused(case, converted, tmp_path):
    d = copy_dir(converted, tmp_path / "dst")
    spoil, error, message = SPOILED[case]
    spoil(d)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("*", r"\*").replace("(", r"\(")):
        load_converted(d)


def test_unverified_folder_is_refused_unless_asked_for(source, tmp_path):
    convert_checkpoint(source, tmp_path / "dst", verify=False, progress=False)
    assert json.loads((tmp_path / "dst" / "moefuse.json").read_text())["probe"] is None
    with pytest.raises(UnverifiedCheckpoint, match="without its probe"):
        load_converted(tmp_path / "dst")
    assert load_converted(tmp_path / "dst", allow_unverified=True) is not None


# ------------------------------------------------------------------------------------------ killed runs

KILL_AT = {  # point → (function of moefuse.checkpoint after whose call the process is killed, what that means)
    "loaded": "_load_source",  # the temporary folder exists, nothing written yet
    "written": "_write_safetensors",  # the tensors are written, the probe has not run
    "probed": "_build_converted",  # the probe's model is built: moefuse.json must not exist yet
}

DRIVER = """
import os, signal, sys
import moefuse.checkpoint as ckpt
from moefuse.cli import main
point, sig = sys.argv[1], getattr(signal, sys.argv[2])
real = getattr(ckpt, point)
def killed(*args, **kwargs):
    out = real(*args, **kwargs)
    tmp = next(p for p in os.listdir(os.path.dirname(sys.argv[4])) if ckpt.TEMP_MARK in p)
    print("moefuse.json there:", os.path.exists(os.path.join(os.path.dirname(sys.argv[4]), tmp, "moefuse.json")),
          flush=True)
    os.kill(os.getpid(), sig)
    return out
setattr(ckpt, point, killed)
sys.exit(main(sys.argv[3:]))
"""


def run_killed(point: str, sig: str, src: Path, dst: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", DRIVER, KILL_AT[point], sig, str(src), str(dst), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("point", sorted(KILL_AT))
def test_sigkill_leaves_a_folder_the_next_run_removes(point, source, tmp_path):
    dst = tmp_path / "dst"
    done = run_killed(point, "SIGKILL", source, dst)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "moefuse.json there: False" in done.stdout  # written last: a killed run never leaves one
    left = leftovers(tmp_path)
    assert not dst.exists() and len(left) == 1, left
    assert left[0].startswith(f".dst{TEMP_MARK}{socket.gethostname()}.")
    with pytest.raises(NotConverted):  # what a user pointing at the leftover gets
        load_converted(tmp_path / left[0])
    convert_checkpoint(source, dst, progress=False)  # the next run
    assert leftovers(tmp_path) == [] and load_converted(dst) is not None


def test_sigterm_removes_its_own_folder(source, tmp_path):
    done = run_killed("written", "SIGTERM", source, tmp_path / "dst")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "interrupted (nothing was written)" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_temp_folders_of_live_processes_and_other_hosts_are_kept(source, tmp_path):
    live = tmp_path / f".dst{TEMP_MARK}{socket.gethostname()}.1.abcd"  # pid 1 is alive
    other = tmp_path / f".dst{TEMP_MARK}other-host.99999999.abcd"
    dead = tmp_path / f".dst{TEMP_MARK}{socket.gethostname()}.99999999.abcd"  # beyond pid_max: dead
    for p in (live, other, dead):
        p.mkdir()
    convert_checkpoint(source, tmp_path / "dst", verify=False, progress=False)
    assert live.is_dir() and other.is_dir() and not dead.exists()


# ---------------------------------------------------------------- bad input the issue did not name

UNNAMED = {  # name → (how SRC is spoiled, extra arguments, error in the message)
    "num_experts_a_string": (_set_config(num_experts="eight"), [], "Validation error for field 'num_experts'"),
    "dtype_unknown": (_set_config(dtype="float8"), [], "has no attribute 'float8'"),
    "top_k_above_experts": (_set_config(num_experts_per_tok=9), [], "source model itself fails on a probe input"),
    "top_k_above_experts_unverified": (_set_config(num_experts_per_tok=9), ["--no-verify"],
                                       "top_k=9 exceeds num_experts=8"),
    "top_k_zero": (_set_config(num_experts_per_tok=0), [], "MoESpec.top_k must be >= 1"),
    "config_is_a_directory": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), [],
                              "has no config.json"),
    "config_binary": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"), [], "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(UNNAMED))
def test_unnamed_bad_sources_are_user_errors(case, source, tmp_path, capsys):
    src = copy_dir(source, tmp_path / "src")
    spoil, extra, message = UNNAMED[case]
    spoil(src)
    rc, io = run_cli([src, tmp_path / "dst", *extra], capsys)
    assert_user_error(rc, io, message)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_destination_under_a_file_or_equal_to_the_source(source, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, io = run_cli([source, tmp_path / "file" / "dst"], capsys)
    assert_user_error(rc, io, "is not a directory")
    rc, io = run_cli([source, source], capsys)
    assert_user_error(rc, io, "exists already")


# ------------------------------------------------------------- a model that is not a transformers model

USER_PACKAGE = '''
import torch
from torch import nn


class GLU(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate, self.up = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, h, i, e, k, odd=False):
        super().__init__()
        self.router = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(GLU(h, 2 * i if odd and j == 1 else i) for j in range(e))
        self.top_k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, ids = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == j)
            out.index_add_(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out.view(x.shape)


class Net(nn.Module):
    """Token ids → logits, two MoE blocks (the second one's experts unequal when odd=True)."""

    def __init__(self, vocab=64, hidden=32, inner=16, experts=4, top_k=2, odd=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([Block(hidden, inner, experts, top_k), Block(hidden, inner, experts, top_k, odd)])
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
'''


@pytest.fixture
def user_source(tmp_path, monkeypatch):
    """(SRC of a user's model saved with safetensors, the package's module, its logits on a probe)."""
    import importlib

    from safetensors.torch import save_model

    (tmp_path / "usermoe_pkg.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("usermoe_pkg")
    torch.manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_model(module.Net(odd=True), str(src / "model.safetensors"))
    yield src, module
    sys.modules.pop("usermoe_pkg", None)


def test_model_class_is_converted_and_reports_what_it_skipped(user_source, tmp_path, capsys):
    src, module = user_source
    args = ["--model-class", "usermoe_pkg:Net", "--model-args", '{"odd": true}', "--probe-shape", "2,9",
            "--probe-vocab", "64"]
    rc, io = run_cli([src, tmp_path / "dst", *args], capsys)
    assert rc == 0, io.err
    assert "blocks.0.experts: E=4 K=2 H=32 I=16" in io.out and "blocks.1: left as it is: expert 1's" in io.out, io.out
    report = json.loads((tmp_path / "dst" / "moefuse.json").read_text())
    assert report["model_class"] == "usermoe_pkg:Net" and report["probe"]["ok"] and report["probe"]["fused_calls"] == 1
    with pytest.raises(ckpt.BadModelClass, match="pass model_class='usermoe_pkg:Net'"):
        load_converted(tmp_path / "dst")
    model = load_converted(tmp_path / "dst", model_class=module.Net)
    assert type(model.blocks[0]).__name__ == "_RoutedBlock" and isinstance(model.blocks[1], module.Block)
    original = module.Net(odd=True)
    from safetensors.torch import load_model
    load_model(original, str(src / "model.safetensors"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(ids), original.eval()(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--model-class", "usermoe_pkg"], "takes package.module:Class"),
    (["--model-class", "no_such_pkg.mod:Net"], "cannot import 'no_such_pkg.mod'"),
    (["--model-class", "usermoe_pkg:Nope"], "has no 'Nope'"),
    (["--model-class", "usermoe_pkg:USER"], "is not a torch.nn.Module class"),
    (["--model-class", "usermoe_pkg:Net", "--model-args", "{odd"], "--model-args is not valid JSON"),
    (["--model-class", "usermoe_pkg:Net", "--model-args", "[1]"], "is a JSON list, not an object"),
    (["--model-class", "usermoe_pkg:Net", "--model-args", '{"colour": 1}', "--no-verify"],
     "unexpected keyword argument 'colour'"),
    (["--model-class", "usermoe_pkg:Net", "--model-args", '{"hidden": 48}', "--no-verify"], "do not fit"),
    (["--model-class", "usermoe_pkg:Net"], "needs the shape of an input"),
    (["--model-class", "usermoe_pkg:Net", "--model-config", "missing.json"], "cannot read the model config"),
    (["--model-class", "usermoe_pkg:Net", "--model-args", '{"odd": true}', "--probe-shape", "2,9"],
     "fails on a probe input of shape [2, 9]"),  # floats where the model takes token ids
    (["--model-class", "usermoe_pkg:Net", "--probe-shape", "2,9", "--probe-vocab", "64"],
     "size mismatch for blocks.1.experts.1"),  # saved with odd=True: expert 1 of block 1 is twice as wide
])
def test_model_class_mistakes_are_user_errors(args, message, user_source, tmp_path, capsys):
    src, module = user_source
    module.USER = 1
    rc, io = run_cli([src, tmp_path / "dst", *args], capsys)
    assert_user_error(rc, io, message)
    assert not (tmp_path / "dst").exists()


def test_missing_converter_dependency_is_a_user_error(source, tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'safetensors'", name="safetensors")

    monkeypatch.setattr(ckpt, "read_source", missing)
    rc, io = run_cli([source, tmp_path / "dst"], capsys)
    assert_user_error(rc, io, "safetensors is not installed")
    assert "moefuse[convert]" in io.err


def test_a_bug_is_still_an_internal_error_with_its_traceback(source, tmp_path, capsys, monkeypatch):
    """The other side of the mapping: what is not the user's or the environment's fault stays exit 3."""
    def bug(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'moefuse.nothing'", name="moefuse.nothing")

    monkeypatch.setattr(ckpt, "read_source", bug)
    rc, io = run_cli([source, tmp_path / "dst"], capsys)
    assert rc == 3 and "Traceback" in io.err and "internal error" in io.err, io.err
    monkeypatch.setattr(ckpt, "read_source", lambda *a, **k: {}["bug"])
    rc, io = run_cli([source, tmp_path / "dst"], capsys)
    assert rc == 3 and "KeyError" in io.err
    assert list(tmp_path.iterdir()) == []


def test_model_class_without_moe_is_unsupported(tmp_path, capsys):
    from safetensors.torch import save_model

    (tmp_path / "src").mkdir()
    save_model(torch.nn.Linear(4, 4), str(tmp_path / "src" / "model.safetensors"))
    rc, io = run_cli([tmp_path / "src", tmp_path / "dst", "--model-class", "torch.nn:Linear",
                      "--model-args", '{"in_features": 4, "out_features": 4}', "--probe-shape", "3,4"], capsys)
    assert_user_error(rc, io, "has no MoE experts module moefuse.convert serves")
    assert leftovers(tmp_path) == [] and not (tmp_path / "dst").exists()
