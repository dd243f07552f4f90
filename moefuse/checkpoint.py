"""moefuse checkpoints on disk: convert a transformers MoE checkpoint once, load it ready to run.

    moefuse-convert SRC_DIR DST_DIR            # or: moefuse.checkpoint.convert_checkpoint(src, dst)
    model = moefuse.load_converted(DST_DIR)     # every MoE layer calls moefuse::moe
    compiled = torch.compile(model, backend="moefuse")

SRC is what `save_pretrained` writes (config.json + one safetensors file or shards with an index). It is
loaded with transformers' own `from_pretrained` (which applies the model's key renames and stacks per-expert
weights), so every model transformers loads with `@use_experts_implementation` experts is handled without a
per-model table. DST holds:

  config.json, and SRC's other small files (tokenizer, generation config) copied as they are
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json (the same index
      format as transformers'); every shard's metadata has {"format": "pt", "moefuse_layout": "1"}
  moefuse.json   the report: what was converted, each layer's MoESpec key, the probe's result. Written
                 last, after the probe: a folder without it is not a converted checkpoint

A model that is not a transformers model (`--model-class package.module:Class`) is described in
`moefuse.custom_model`: the same layout, with the class and its arguments in moefuse.json, no config.json.

Crash safety. DST is built in `.DST.moefuse-tmp-HOST.PID.RANDOM` beside it and renamed into place when
complete, with SRC's permissions; SIGINT/SIGTERM remove it; a run killed outright leaves it, and the next
run for DST removes those of dead processes on this host.

Tensor names. Every tensor keeps its name in the transformers model (`model.state_dict()`), except the
expert weights of each converted experts module at path P (e.g. `model.layers.0.mlp.experts`), which are
stored in the fused op's layout (see `moefuse.spec`), contiguous:

  P.w1  [E, N1, H]  up-projection, out × in; N1 = 2·I for a GLU, rows ordered as the transformers module
                    holds them ([gate; up] for Mixtral/Qwen, interleaved gate/up for GPT-OSS): the layer's
                    spec key (`layers[i].spec` in moefuse.json) says which through its activation slices
  P.w2  [E, H, I]   down-projection, out × in
  P.b1  [E, N1]     only if the experts have biases (GPT-OSS)
  P.b2  [E, H]      only if the experts have biases

`load_converted` builds the model from config.json, puts w1/w2 back into the experts module's parameters
(as transposed *views* where transformers stores them [E, in, out], so the op reads them contiguous),
loads the other tensors, and runs `moefuse.convert` on it. Before building anything it checks moefuse.json
against its schema, config.json (E, K, H, I, biases, dtype, activation) and the tensor files' headers (names,
shapes, dtypes), and it refuses a folder whose probe never ran (`--no-verify`) unless
`allow_unverified=True`. Plain `from_pretrained(DST)` does not understand w1/w2: use `load_converted`.

Both directions hold one copy of the model in memory (plus, while converting with the probe on, the
reference logits); a checkpoint larger than RAM is not supported yet.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The error classes live in moefuse.errors (one hierarchy for the user-facing surface); imported here too so
# that `from moefuse.checkpoint import NotConverted` keeps working.
from moefuse import custom_model
from moefuse.errors import (
    AlreadyConverted, BadConfig, BadDestination, BadDevice, BadModelArgs, BadModelClass, BadReport, CheckpointError,
    CorruptSafetensors,
    DestinationExists, DestinationUnwritable, MismatchedCheckpoint, MissingCheckpoint, NoSafetensors,
    NonFiniteSource, NotConverted, ProbeMismatch, UnsupportedModel, UnverifiedCheckpoint,
)


log = logging.getLogger("moefuse.checkpoint")

LAYOUT_VERSION = "1"  # bump when the on-disk names or layout change; load_converted refuses other versions
REPORT_NAME = "moefuse.json"
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_SHAPE = (2, 8)  # (batch, tokens) of the probe: 16 tokens route to several experts in every layer


# ------------------------------------------------------------------------------------------- progress

def _bar(label: str, total: int, enabled: bool):
    """tqdm's bar on stderr (transformers' own dependency): redrawn in place on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="tensor" if "tensor" in label else "file", disable=not enabled,
                file=sys.stderr, leave=True)


# --------------------------------------------------------------------------------------- reading SRC

@dataclass
class SourceCheckpoint:
    """A checked SRC: its directory and safetensors files (config.json parsed, each file's header read)."""

    path: Path
    files: list[Path]


def _read_config(path: Path):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = path / "config.json"
    if not cfg.is_file():
        raise BadConfig(f"{path} has no config.json", cfg,
                        "point at the directory save_pretrained wrote (it holds config.json and *.safetensors)")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadConfig(f"{cfg} is not valid JSON ({e})", cfg,
                        "restore config.json from the model's source, or rewrite it with config.save_pretrained") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise BadConfig(f"{cfg} is not a transformers config (no 'model_type')", cfg,
                        "restore config.json from the model's source, or rewrite it with config.save_pretrained")
    if not isinstance(raw["model_type"], str) or raw["model_type"] not in CONFIG_MAPPING:
        raise UnsupportedModel(f"transformers does not know model_type {raw['model_type']!r}", cfg,
                               "upgrade transformers, or convert a model transformers can load")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers' validation raises many types; each means a bad value
        said = " ".join(" ".join(str(e).strip().splitlines()[:2]).split())
        raise BadConfig(f"transformers refuses {cfg}: {type(e).__name__}: {said}", cfg,
                        "fix the value it names, or restore config.json from the model's source") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptSafetensors(f"{index} is not a safetensors index ({e!r})", index,
                                     "restore the index from the model's source, or re-save the model") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CorruptSafetensors(f"{index} names shards that are missing: {missing}", index,
                                     "download or copy the missing shards into the checkpoint directory")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        hint = ("re-save it with model.save_pretrained(dir) (safetensors is the default)" if other
                else "point at the directory save_pretrained wrote")
        raise NoSafetensors(f"{path} has no *.safetensors weights" + (f" (found {other})" if other else ""), path, hint)
    if len(files) > 1:
        raise CorruptSafetensors(f"{path} has {len(files)} safetensors files but no {INDEX_NAME}", path,
                                 "restore the index that came with the shards")
    return files


def read_source(src: str | os.PathLike, progress: bool = False, config: bool = True) -> SourceCheckpoint:
    """Check SRC before anything heavy runs: the directory, config.json (unless `config` is False: a model
    that is not a transformers model), and every safetensors header."""
    from safetensors import SafetensorError, safe_open

    path = Path(src)
    if not path.is_dir():
        raise MissingCheckpoint(f"checkpoint directory {path} does not exist" if not path.exists()
                                else f"{path} is not a directory", path,
                                "pass the directory save_pretrained wrote (config.json + *.safetensors)")
    if (path / REPORT_NAME).is_file():
        raise AlreadyConverted(f"{path} was written by moefuse-convert (it has {REPORT_NAME}): it is converted "
                               "already", path, "load it with moefuse.load_converted(path); convert the original "
                                                "transformers checkpoint if you need another dtype")
    if config:
        _read_config(path)
    files = _weight_files(path)
    bar = _bar("reading shards", len(files), progress)
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:  # opening parses the header, checks it against the size
                layout = (st.metadata() or {}).get("moefuse_layout")
        except (SafetensorError, OSError) as e:
            raise CorruptSafetensors(f"{f} cannot be read: {e}", f,
                                     "the file is truncated or damaged: download or copy it again") from e
        if layout is not None:
            raise AlreadyConverted(f"{f} holds tensors in moefuse's layout {layout!r}: {path} is converted already",
                                   f, "convert the original transformers checkpoint, not a converted one")
        bar.update()
    bar.close()
    return SourceCheckpoint(path, files)


def _load_source(source: SourceCheckpoint, dtype: str, progress: bool):
    """The model with SRC's weights, through transformers' from_pretrained (its key renames included). Missing,
    unexpected or wrongly shaped tensors are an error here: transformers would fill them with random values."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    try:
        if not progress:  # transformers draws its own "Loading weights" bar
            hf_logging.disable_progress_bar()
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, output_loading_info=True, ignore_mismatched_sizes=True,
            dtype="auto" if dtype == "auto" else _DTYPES[dtype])
    except (SafetensorError, OSError) as e:
        raise CorruptSafetensors(f"the weights in {source.path} cannot be read: {e}", source.path,
                                 "a shard is damaged: download or copy it again") from e
    except ValueError as e:
        raise UnsupportedModel(f"transformers cannot build a causal LM from {source.path}: {e}", source.path,
                               "moefuse-convert handles transformers *ForCausalLM MoE checkpoints") from e
    except RuntimeError as e:  # transformers' weight conversion (stacking per-expert tensors, renames) failed
        raise MismatchedCheckpoint(f"transformers cannot assemble the tensors in {source.path} into its model: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", source.path,
                                   "a tensor has the wrong shape for config.json (transformers' report above "
                                   "names it): restore the weights or the config that came with them") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = {kind: sorted(str(k) for k in info.get(kind) or ())
                for kind in ("mismatched_keys", "missing_keys", "unexpected_keys")}
    if any(problems.values()):
        detail = "; ".join(f"{kind.replace('_', ' ')}: {keys[:6]}{' …' if len(keys) > 6 else ''}"
                           for kind, keys in problems.items() if keys)
        raise MismatchedCheckpoint(f"the tensors in {source.path} do not match its config.json ({detail})",
                                   source.path, "config.json and the weights come from different models: "
                                                "restore the config that came with these weights")
    return model.eval()


# ---------------------------------------------------------------------------------------- converting

def _fused_modules(model) -> dict[str, torch.nn.Module]:
    """The modules of a converted model that call the fused op, by path: transformers experts modules switched
    to the "moefuse" experts implementation (their own parameters, in transformers' layout), and modules
    `moefuse.convert` swapped in that own the stacked weights as parameters w1, w2 (b1, b2), in the op's."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "_moefuse_activation")}


def _in_op_layout(m) -> bool:
    return isinstance(getattr(m, "w1", None), torch.nn.Parameter)


def _param_names(m) -> dict[str, str]:
    """moefuse name → the module's parameter holding that weight."""
    if _in_op_layout(m):
        return {n: n for n in ("w1", "w2", "b1", "b2") if getattr(m, n, None) is not None}
    names = {"w1": "gate_up_proj" if m.has_gate else "up_proj", "w2": "down_proj"}
    if m.has_bias:
        names |= {"b1": names["w1"] + "_bias", "b2": "down_proj_bias"}
    return names


def _top_k(model, path: str) -> int | None:
    """K of the router feeding the experts at `path`: its own, its MoE block's or the router's `top_k`, or
    config.num_experts_per_tok; None when none says (a user's routing code that keeps K to itself)."""
    parent = model.get_submodule(path.rpartition(".")[0])
    for m in (model.get_submodule(path), parent, *parent.modules()):
        k = getattr(m, "top_k", None)
        if isinstance(k, int):
            return k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) else None


def _converted_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, str], list[dict]]:
    """(tensors to write, tied name → kept name, per-layer report entries). A layer's `spec` is None where
    its top-k is not known (a user's model whose routing code keeps K to itself)."""
    from moefuse.conversion import expert_weights, spec_key
    from moefuse.spec import MoESpec

    state = model.state_dict()
    layers = []
    for path, m in _fused_modules(model).items():
        w1, w2, b1, b2 = expert_weights(m)
        ours = {"w1": w1, "w2": w2, "b1": b1, "b2": b2}
        names = {}
        for short, param in _param_names(m).items():
            del state[f"{path}.{param}"]
            state[f"{path}.{short}"] = ours[short].contiguous()
            names[short] = f"{path}.{short}"
        k = _top_k(model, path)
        if k is None and hasattr(model, "config"):
            raise UnsupportedModel(f"cannot tell the top-k of the router feeding {path}", path,
                                   "moefuse-convert reads it from the router's top_k or config.num_experts_per_tok")
        try:
            spec = None if k is None else MoESpec.from_key(spec_key(m, w1.dtype, k))
        except ValueError as e:  # e.g. a top-k outside 1..E in config.json
            raise BadConfig(f"{path}: the layer's config.json values do not make a MoE layer: {e}", path,
                            "restore config.json from the model's source") from e
        describe = spec.describe() if spec is not None else (
            f"E={w1.shape[0]} H={w2.shape[1]} I={w2.shape[2]} {str(w1.dtype).removeprefix('torch.')} "
            f"act={m._moefuse_activation.expr} (top-k chosen by the model's own routing code)")
        layers.append({"module": path, "tensors": names, "params": _param_names(m),
                       "spec": None if spec is None else spec.to_key(), "describe": describe})
    # Tied weights (e.g. lm_head = embed_tokens) are one storage: safetensors stores it once.
    tied, seen = {}, {}
    for name, t in list(state.items()):
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            tied[name] = seen[key]
            del state[name]
        else:
            seen[key] = name
    return state, tied, layers


def _write_safetensors(tensors: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int, progress: bool) -> list[str]:
    """Write `tensors` as one file or as shards with transformers' index format; return the file names.
    Sharded by huggingface_hub's `split_torch_state_dict_into_shards`, as `save_pretrained` shards."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    meta = {"format": "pt", "moefuse_layout": LAYOUT_VERSION}
    bar = _bar("writing tensors", len(tensors), progress)
    for fname, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(dst / fname), metadata=meta)
        _check_written(dst / fname, len(names))
        bar.update(len(names))
    bar.close()
    if split.is_sharded:
        (dst / INDEX_NAME).write_text(json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                                                 indent=2, sort_keys=True))
    return list(split.filename_to_tensors)


def _check_written(path: Path, count: int) -> None:
    """Read a file just written back: a file system may report a short write late or not at all (a full disk
    seen only at close, which safetensors does not check), and a truncated shard must not pass for one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            ok = len(list(f.keys())) == count
    except SafetensorError as e:
        ok, detail = False, str(e)
    else:
        detail = f"{count} tensors written, another number read back"
    if not ok:
        raise DestinationUnwritable(f"{path} was written incompletely ({detail})", path,
                                    "the file system may be full or failing: free space, or choose another "
                                    "destination")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """SRC's small non-weight files (tokenizer, generation config, …), copied as they are."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in ("config.json", INDEX_NAME, REPORT_NAME) and p.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def _probe_ids(config, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, PROBE_SHAPE, generator=gen).to(device)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return custom_model.output_tensor(model(ids)).float()


def _model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point parameters (a transformers model says so itself)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_device(device: str | torch.device) -> torch.device:
    """`device` parsed and present on this machine; BadDevice otherwise (before anything is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BadDevice(f"unknown device {device!r}", None, "use cpu (the default), cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise BadDevice(f"device {device!r}: this machine has no {dev.type} device (torch.{dev.type}.is_available() "
                        "is False)", None, "run the probe on the CPU: --device cpu (the default)")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise BadDevice(f"device {device!r}: this machine has {count} {dev.type} device(s)", None,
                        f"use {dev.type}:0 … {dev.type}:{count - 1}")
    return dev


# ------------------------------------------------------------------- the destination (crash-safe writing)
# DST is built in a temporary folder beside it, `.DST.moefuse-tmp-HOST.PID.RANDOM`, renamed into place only
# when complete, moefuse.json last. A run killed outright (SIGKILL, power) cannot remove its folder: the
# next run for the same DST removes the folders of this host whose process is gone.

TEMP_MARK = ".moefuse-tmp-"


def _temp_prefix(dst: Path) -> str:
    return f".{dst.name}{TEMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(dst: Path) -> list[Path]:
    """Remove the temporary folders beside `dst` left by killed runs on this host; return them. Folders of
    live processes and of other hosts (shared storage: their pids mean nothing here) are left alone."""
    prefix, host, removed = _temp_prefix(dst), socket.gethostname(), []
    for p in dst.parent.glob(glob.escape(prefix) + "*"):
        owner, _, rest = p.name[len(prefix):].rpartition(".")[0].rpartition(".")
        if owner == host and rest.isdigit() and int(rest) != os.getpid() and not _pid_alive(int(rest)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.info("removed %s, left by a killed moefuse-convert (pid %s)", p, rest)
    return removed


def _unwritable(e: OSError, where: Path) -> DestinationUnwritable:
    hint = {errno.ENOSPC: "free space on that file system, or choose a destination on another one",
            errno.EDQUOT: "your disk quota is used up: free space, or choose a destination elsewhere",
            errno.EROFS: "that file system is read-only: choose a destination on a writable one",
            errno.EACCES: "you may not write there: choose a destination you own, or fix its permissions",
            errno.EPERM: "you may not write there: choose a destination you own, or fix its permissions",
            }.get(e.errno, "choose another destination")
    return DestinationUnwritable(f"cannot write in {where}: {e.strerror or e}", where, hint)


@contextlib.contextmanager
def _writing(where: Path):
    """OS write failures (no space, read-only, permission) as DestinationUnwritable, safetensors' included
    (it reports them as `SafetensorError: Error while serializing: IoError(Os { code: 28, … })`)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        raise _unwritable(e, where) from e
    except SafetensorError as e:
        code = re.search(r"Os \{ code: (\d+)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise _unwritable(OSError(n, os.strerror(n)), where) from e


def _make_temp(dst: Path) -> Path:
    """The temporary folder DST is built in: created now, before anything is loaded, so that an unwritable
    destination is found out in a second rather than after loading the model."""
    tmp = dst.parent / f"{_temp_prefix(dst)}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    with _writing(dst.parent):
        os.mkdir(tmp, 0o700)
    return tmp


def _write_json(path: Path, data: dict) -> None:
    """Write JSON durably and atomically: a reader sees the old file, none, or the whole new one."""
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _non_finite_params(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "auto", verify: bool = True,
                       device: str = "cpu", max_shard_bytes: int = 4 << 30, progress: bool = True,
                       model_class: str | type | None = None, model_args: dict | None = None,
                       probe_shape: tuple[int, ...] | None = None, probe_vocab: int | None = None) -> dict:
    """Convert the transformers checkpoint in `src` to moefuse's layout in a new directory `dst`.

    model_class, model_args: a model that is not a transformers MoE model (`moefuse.custom_model`): built as
        `model_class(**model_args)` and loaded from `src`'s safetensors files (no config.json needed); its
        probe input is `probe_shape` random floats, or token ids below `probe_vocab`. Modules `convert`
        skips are listed in the report, the rest converted.

    dtype: "auto" (the checkpoint's) or one of float32/float16/bfloat16, for every tensor written.
    verify: run a probe batch (`PROBE_SHAPE` tokens) through the original model and through the converted
        one as `load_converted(dst)` builds it, and fail with ProbeMismatch if the logits differ by more than
        the dtype's tolerance (`moefuse.compiler.verify.TOLERANCE`, relative to the largest logit). The result
        is recorded in moefuse.json; without it, `load_converted` needs `allow_unverified=True`.
    The device, DST and its parent are checked before anything is loaded. DST is built in a temporary folder
    beside it (moefuse.json written last) and renamed into place only when everything passed: `dst` either
    does not exist or is complete, with SRC's permissions. `src` is only read. Returns the report (also in
    dst/moefuse.json). Raises a CheckpointError subclass on bad input or an environment fault.
    """
    from moefuse.compiler.verify import TOLERANCE
    from moefuse.conversion import convert
    from moefuse.metrics import rel_err
    from moefuse.runtime import op as moe_op

    if dtype != "auto" and dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}", None, f"use auto or one of {sorted(_DTYPES)}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"the largest shard must be a positive number of bytes, got {max_shard_bytes!r}",
                              None, "--max-shard-size takes MiB ≥ 1 (default 4096)")
    dev = check_device(device)
    cls = None if model_class is None else custom_model.import_class(model_class)  # before anything is loaded
    if cls is not None:
        try:
            ok = isinstance(model_args or {}, dict) and json.loads(json.dumps(model_args or {})) == (model_args or {})
        except (TypeError, ValueError):
            ok = False
        if not ok:  # moefuse.json records them, so that load_converted can rebuild the model
            raise BadModelArgs(f"model_args must be a dict of JSON values, got {model_args!r}", None,
                               "pass the constructor's keyword arguments as numbers, strings, lists and dicts")
    if cls is not None and verify and not probe_shape:
        raise CheckpointError(f"{custom_model.class_name(cls)} is not a transformers model: the probe needs the "
                              "shape of an input it takes", None, "give --probe-shape (e.g. 2,9,64, with "
                              "--probe-vocab N for token ids), or --no-verify")
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path.exists():
        raise DestinationExists(f"{dst_path} exists already; moefuse-convert never overwrites", dst_path,
                                "choose a new destination, or remove the old one yourself")
    if not dst_path.parent.is_dir():
        there = "is not a directory" if dst_path.parent.exists() else "does not exist"
        raise BadDestination(f"the parent directory of {dst_path} {there}", dst_path,
                             f"create the directory {dst_path.parent} first, or choose another destination")
    if dst_path.is_relative_to(src_path):
        raise BadDestination(f"{dst_path} lies inside the source checkpoint {src_path}", dst_path,
                             "write the converted checkpoint outside the source directory")
    source = read_source(src_path, progress, config=cls is None)
    remove_stale_temps(dst_path)
    tmp = _make_temp(dst_path)
    try:
        if cls is None:
            model = _load_source(source, dtype, progress)
        else:
            model = custom_model.build(cls, model_args or {})
            custom_model.load_weights(model, source.files)
            model = (model if dtype == "auto" else model.to(_DTYPES[dtype])).eval()
        if verify:
            ids = _probe_ids(model.config, dev) if cls is None else custom_model.probe_input(
                tuple(probe_shape), probe_vocab, _model_dtype(model), dev)
            try:
                reference = _logits(model.to(dev), ids)
            except (RuntimeError, ValueError, IndexError) as e:
                raise UnsupportedModel(f"the source model itself fails on a probe input of shape {list(ids.shape)}: "
                                       f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}",
                                       src_path, "config.json's values do not make a working model (e.g. "
                                       "num_experts_per_tok outside 1..num_experts): restore it" if cls is None else
                                       "check --probe-shape / --probe-vocab against what the model takes, and "
                                       "--model-args") from e
            model.to("cpu")
            if not torch.isfinite(reference).all():
                bad = _non_finite_params(model)
                raise NonFiniteSource(
                    f"the source model's own logits on the probe batch are not finite (NaN or inf): "
                    + (f"its weights hold NaN/inf in {bad[:6]}{' …' if len(bad) > 6 else ''}" if bad else
                       f"they overflow in {str(_model_dtype(model)).removeprefix('torch.')}"), src_path,
                    "restore the weights from the model's source" if bad else
                    "convert with --dtype float32 or --dtype bfloat16")
        summary = convert(model)
        if summary.skipped and cls is None:
            raise UnsupportedModel(f"moefuse.convert cannot serve every MoE layer of {src_path}:\n{summary}",
                                   src_path, "the layers listed are not supported yet; the model runs with "
                                             "transformers as is")
        if not summary.converted:
            raise UnsupportedModel(f"{src_path} ({type(model).__name__}) has no MoE experts module "
                                   f"moefuse.convert serves" + (f":\n{summary}" if summary.skipped else ""), src_path,
                                   "moefuse-convert handles transformers MoE models whose experts use transformers' "
                                   "experts interface (3-D stacked weights)" if cls is None else
                                   "the forms moefuse.convert recognises are listed in moefuse.conversion")
        tensors, tied, layers = _converted_tensors(model)
        report = {
            "format": "moefuse-checkpoint", "layout_version": LAYOUT_VERSION, "source": str(src_path),
            "source_files": [f.name for f in source.files],
            "model_type": model.config.model_type if cls is None else None, "architecture": type(model).__name__,
            "model_class": None if cls is None else custom_model.class_name(cls), "model_args": model_args or {},
            "dtype": str(_model_dtype(model)).removeprefix("torch."), "layers": layers, "tied": tied,
            "skipped": dict(summary.skipped), "probe": None,
        }
        with _writing(dst_path.parent):
            if cls is None:
                model.config.save_pretrained(tmp)
            report["copied"] = _copy_side_files(src_path, tmp)
            report["files"] = _write_safetensors(tensors, tmp, max_shard_bytes, progress)
        del tensors, model  # the converted model is rebuilt from tmp, as a user would
        if verify:
            converted = _build_converted(tmp, report, dev, cls)  # convert's own probes run the op: count after
            before = moe_op.counters["cpu"] + moe_op.counters["triton"]
            out = _logits(converted, ids)
            calls = moe_op.counters["cpu"] + moe_op.counters["triton"] - before
            tol = TOLERANCE[_DTYPES[report["dtype"]]]
            err = rel_err(out, reference)
            report["probe"] = {"tokens": ids.numel(), "rel_err": err, "tolerance": tol, "fused_calls": calls,
                               "device": str(dev), "ok": err <= tol and calls == len(layers)}
            if not report["probe"]["ok"]:
                raise ProbeMismatch(
                    f"the converted model does not match the original on the probe batch: relative error "
                    f"{err:.3g} (tolerance {tol:g}), {calls} fused calls for {len(layers)} layers", dst_path,
                    "please report this with the model's config.json; --no-verify writes it regardless (unsafe)")
        with _writing(dst_path.parent):
            _write_json(tmp / REPORT_NAME, report)  # last: a folder without it is not a converted checkpoint
            # SRC's mode, not mkdir's 0700: who may read SRC may read DST (and its owner may always remove it)
            os.chmod(tmp, stat.S_IMODE(src_path.stat().st_mode) | stat.S_IRWXU)
            if dst_path.exists():  # created while we worked: never replace it
                raise DestinationExists(f"{dst_path} appeared while converting; moefuse-convert never "
                                        "overwrites", dst_path, "choose a new destination")
            os.rename(tmp, dst_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["destination"] = str(dst_path)
    log.info("converted %d MoE layer(s) of %s into %s", len(layers), src_path, dst_path)
    return report


# ------------------------------------------------------------------------------------------- loading

_REPORT_FIELDS = {"format": str, "layout_version": str, "model_type": (str, type(None)), "architecture": str,
                  "dtype": str, "files": list, "layers": list, "tied": dict, "probe": (dict, type(None))}
_CUSTOM_FIELDS = {"model_class": str, "model_args": dict, "skipped": dict}  # a model given by --model-class
_LAYER_FIELDS = {"module": str, "tensors": dict, "spec": (str, type(None))}
_PROBE_FIELDS = {"ok": bool, "rel_err": (int, float), "tolerance": (int, float), "tokens": int,
                 "fused_calls": int, "device": str}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_AGAIN = "moefuse.json, config.json or a tensor file was edited or damaged: convert the source checkpoint again"


def _check_fields(obj, fields: dict, where: str, rp: Path) -> None:
    if not isinstance(obj, dict):
        raise BadReport(f"{rp}: {where} is a {type(obj).__name__}, not an object", rp, _AGAIN)
    for name, typ in fields.items():
        if name not in obj:
            raise BadReport(f"{rp}: {where} has no {name!r}", rp, _AGAIN)
        if not isinstance(obj[name], typ) or (typ is int and isinstance(obj[name], bool)):
            raise BadReport(f"{rp}: {where}'s {name!r} is {obj[name]!r}, of the wrong type", rp, _AGAIN)


def _check_report(report, rp: Path) -> None:
    """moefuse.json against its schema (names, types, the values they may take)."""
    _check_fields(report, _REPORT_FIELDS, "the report", rp)
    if report.get("model_class") is not None:
        _check_fields(report, _CUSTOM_FIELDS, "the report", rp)
    elif report["model_type"] is None:
        raise BadReport(f"{rp}: neither 'model_type' nor 'model_class' says which model this is", rp, _AGAIN)
    elif any(layer.get("spec") is None for layer in report["layers"] if isinstance(layer, dict)):
        raise BadReport(f"{rp}: a layer of a transformers model without its spec", rp, _AGAIN)
    if report["dtype"] not in _DTYPES:
        raise BadReport(f"{rp}: dtype {report['dtype']!r} is none of {sorted(_DTYPES)}", rp, _AGAIN)
    files = report["files"]
    if not files or not all(isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f
                            and not f.startswith(".") for f in files):
        raise BadReport(f"{rp}: 'files' must list the folder's own *.safetensors files, got {files!r}", rp, _AGAIN)
    if not report["layers"]:
        raise BadReport(f"{rp}: 'layers' is empty", rp, _AGAIN)
    for i, layer in enumerate(report["layers"]):
        _check_fields(layer, _LAYER_FIELDS, f"layers[{i}]", rp)
        t = layer["tensors"]
        if not {"w1", "w2"} <= set(t) <= {"w1", "w2", "b1", "b2"} or not all(isinstance(v, str) for v in t.values()):
            raise BadReport(f"{rp}: layers[{i}].tensors must map w1, w2 (b1, b2) to tensor names, got {t!r}", rp,
                            _AGAIN)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in report["tied"].items()):
        raise BadReport(f"{rp}: 'tied' must map tensor names to tensor names", rp, _AGAIN)
    if report["probe"] is not None:
        _check_fields(report["probe"], _PROBE_FIELDS, "the probe", rp)


def _read_report(path: Path) -> dict:
    rp = path / REPORT_NAME
    if not rp.is_file():
        raise NotConverted(f"{path} has no {REPORT_NAME}: it was not written by moefuse-convert", path,
                           "convert it first: moefuse-convert SRC_DIR DST_DIR; a plain transformers checkpoint "
                           "loads with from_pretrained and then moefuse.convert(model)")
    try:
        report = json.loads(rp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadReport(f"{rp} is not valid JSON ({e})", rp, "convert the source checkpoint again") from e
    if not isinstance(report, dict) or report.get("format") != "moefuse-checkpoint" \
            or report.get("layout_version") != LAYOUT_VERSION:
        version = report.get("layout_version") if isinstance(report, dict) else None
        raise NotConverted(f"{rp} describes layout {version!r}; this moefuse reads "
                           f"{LAYOUT_VERSION!r}", rp, "convert the source checkpoint again with this moefuse")
    _check_report(report, rp)
    return report


def _stored_tensors(path: Path, files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, dtype name) of every tensor in `files`, read from their headers (no data loaded)."""
    from safetensors import SafetensorError, safe_open

    stored = {}
    for fname in files:
        try:
            with safe_open(str(path / fname), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    stored[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise CorruptSafetensors(f"{path / fname} cannot be read: {e}", path / fname,
                                     "convert the source checkpoint again") from e
    return stored


def _check_layer(layer: dict, spec, m, model, stored: dict, dtype: str, path: Path) -> None:
    """One layer of moefuse.json against the module config.json builds and the tensors on disk."""
    from moefuse.conversion import expert_weights

    module = layer["module"]
    w1, w2, b1, b2 = expert_weights(m)
    shapes = {"w1": tuple(w1.shape), "w2": tuple(w2.shape), "b1": None if b1 is None else tuple(b1.shape),
              "b2": None if b2 is None else tuple(b2.shape)}  # as the model built from its description has them
    if set(layer["tensors"]) != set(_param_names(m)):
        raise BadReport(f"{module}: moefuse.json lists tensors {sorted(layer['tensors'])}, the model needs "
                        f"{sorted(_param_names(m))}", path / REPORT_NAME, _AGAIN)
    for short, name in layer["tensors"].items():
        if name not in stored:
            raise MismatchedCheckpoint(f"{module}.{short}: moefuse.json names tensor {name!r}, which no file of "
                                       f"{path} holds", path, _AGAIN)
        shape, dt = stored[name]
        if shape != shapes[short] or dt != dtype:
            raise MismatchedCheckpoint(f"{name} is {dt} {list(shape)} on disk; the layer needs {dtype} "
                                       f"{list(shapes[short])}", path, _AGAIN)
    if spec is None:  # a user's model whose routing keeps K to itself: nothing more was recorded
        return
    built = {"num_experts": w1.shape[0], "top_k": _top_k(model, module), "hidden": w2.shape[1],
             "intermediate": w2.shape[2], "up_rows": w1.shape[1], "w1_bias": b1 is not None,
             "w2_bias": b2 is not None, "dtype": dtype}
    for name, value in built.items():
        if getattr(spec, name) != value:
            raise BadReport(f"{module}: moefuse.json records {name}={getattr(spec, name)!r}, the model config.json "
                            f"describes has {value!r}", path / REPORT_NAME, _AGAIN)
    if m._moefuse_activation != spec.activation:
        raise MismatchedCheckpoint(f"{module}: the model's activation is {m._moefuse_activation}, "
                                   f"the checkpoint was converted for {spec.activation}", path,
                                   "convert the source checkpoint again with this moefuse")


def load_converted(path: str | os.PathLike, device: str | torch.device = "cpu", allow_unverified: bool = False,
                   model_class: str | type | None = None):
    """The model moefuse-convert wrote to `path`, ready to run: every MoE layer calls moefuse::moe.

    Returns a transformers *ForCausalLM in eval mode, in the dtype it was converted to, on `device`, already
    through `moefuse.convert`: its experts modules hold the stored w1/w2 (as views in transformers' layout
    where transformers keeps its own module) and call the fused op; compile it with `backend="moefuse"` for
    one fused node per layer. Before building anything, moefuse.json is checked against its schema, against
    config.json (E, K, H, I, biases, dtype, activation) and against the tensor files' headers (names, shapes,
    dtypes). A folder whose probe never ran (`moefuse-convert --no-verify`) is refused unless
    `allow_unverified=True`. Raises NotConverted, BadReport, UnverifiedCheckpoint, MismatchedCheckpoint or
    UnsupportedModel when the directory does not fit.

    A folder converted with `--model-class` holds a model that is not a transformers model: pass the same
    class as `model_class` (the class or "package.module:Class"); it is rebuilt with the recorded
    arguments. moefuse never imports a class because a folder names it.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingCheckpoint(f"converted checkpoint directory {path} does not exist", path,
                                "pass the DST directory moefuse-convert wrote")
    report = _read_report(path)
    probe = report["probe"]
    if probe is None and not allow_unverified:
        raise UnverifiedCheckpoint(f"{path} was converted without its probe (moefuse-convert --no-verify): nothing "
                                   "checked that it computes what the original model does", path,
                                   "convert again without --no-verify, or pass allow_unverified=True to load "
                                   "it anyway")
    if probe is not None and not probe["ok"]:
        raise UnverifiedCheckpoint(f"{path}'s probe failed (relative error {probe['rel_err']:.3g})", path, _AGAIN)
    recorded = report.get("model_class")
    cls = None
    if recorded is not None or model_class is not None:
        if recorded is None:
            raise BadModelClass(f"{path} holds a transformers model ({report['architecture']}); model_class is "
                                "for folders converted with --model-class", path, "leave model_class out")
        if model_class is None:
            raise BadModelClass(f"{path} holds a {recorded} model, converted with --model-class", path,
                                f"pass model_class={recorded!r} (or the class itself): moefuse imports no class "
                                "a folder names")
        cls = custom_model.import_class(model_class)
        if custom_model.class_name(cls) != recorded:
            raise BadModelClass(f"{path} holds a {recorded} model, not a {custom_model.class_name(cls)}", path,
                                f"pass model_class={recorded!r}")
    return _build_converted(path, report, check_device(device), cls)


def _build_converted(path: Path, report: dict, device: torch.device, cls: type | None = None):
    """The converted model from a folder and its (checked) report: what load_converted returns, and what the
    probe runs before moefuse.json is written."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from moefuse.conversion import convert
    from moefuse.spec import MoESpec

    if cls is None:
        config = _read_config(path)
        if config.model_type != report["model_type"]:
            raise BadReport(f"moefuse.json was written for model_type {report['model_type']!r}, config.json says "
                            f"{config.model_type!r}", path / REPORT_NAME, _AGAIN)
    stored = _stored_tensors(path, report["files"])
    for name, kept in report["tied"].items():
        if kept not in stored:
            raise MismatchedCheckpoint(f"moefuse.json ties {name} to {kept!r}, which no file of {path} holds",
                                       path, _AGAIN)
    specs = []
    for layer in report["layers"]:
        try:
            specs.append(None if layer["spec"] is None else MoESpec.from_key(layer["spec"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
            raise BadReport(f"{layer['module']}: the layer spec in moefuse.json cannot be read ({e!r})",
                            path / REPORT_NAME, _AGAIN) from e
    if cls is None:
        with no_init_weights():  # every parameter is overwritten below; random init would only cost time
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[report["dtype"]])
        model.tie_weights()  # done by the init no_init_weights skipped: lm_head = embed_tokens where config ties
    else:
        model = custom_model.build(cls, report["model_args"]).to(_DTYPES[report["dtype"]])
    # Converted first, so that modules convert swaps in (owning w1/w2 themselves) exist to load into
    summary = convert(model)
    fused = _fused_modules(model)
    want = [layer["module"] for layer in report["layers"]]
    if set(summary.skipped) != set(report.get("skipped", {})) or sorted(fused) != sorted(want):
        raise UnsupportedModel(f"moefuse.convert serves {sorted(fused)} here, the checkpoint was converted for "
                               f"{want}:\n{summary}", path, "convert the source checkpoint again with this moefuse")
    for layer, spec in zip(report["layers"], specs):
        _check_layer(layer, spec, fused[layer["module"]], model, stored, report["dtype"], path)
    state: dict[str, torch.Tensor] = {}
    for fname in report["files"]:
        try:
            state |= load_file(str(path / fname))
        except Exception as e:  # safetensors raises its own error type, or OSError for a missing file
            raise CorruptSafetensors(f"{path / fname} cannot be read: {e}", path / fname,
                                     "convert the source checkpoint again") from e
    for name, kept in report["tied"].items():
        state[name] = state[kept]
    placed = set()
    for layer in report["layers"]:
        m = fused[layer["module"]]
        for short, param in _param_names(m).items():
            t = state.pop(layer["tensors"][short])
            old = getattr(m, param)
            if not _in_op_layout(m) and m.is_transposed and t.dim() == 3:
                t = t.transpose(-2, -1)  # transformers keeps these [E, in, out]: a view of the stored tensor
            setattr(m, param, torch.nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad))
            placed.add(f"{layer['module']}.{param}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor whose shape does not fit the model config.json describes
        raise MismatchedCheckpoint(f"{path}: the tensors do not fit the model config.json describes: "
                                   f"{str(e).strip().splitlines()[-1]}", path, _AGAIN) from e
    missing = sorted(set(missing) - placed)
    if missing or unexpected:
        raise MismatchedCheckpoint(f"{path}: tensors missing {missing[:6]}, unexpected {sorted(unexpected)[:6]}",
                                   path, "config.json does not belong to these weights: convert again")
    return model.to(device).eval()
