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
  moefuse.json   the report: what was converted, each layer's MoESpec key, the probe's error

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
loads the other tensors, and runs `moefuse.convert` on it, checking that each layer's activation and layout
are the ones recorded. Plain `from_pretrained(DST)` does not understand w1/w2: use `load_converted`.

Both directions hold one copy of the model in memory (plus, while converting with the probe on, the
reference logits); a checkpoint larger than RAM is not supported yet.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moefuse.errors import MoefuseError

log = logging.getLogger("moefuse.checkpoint")

LAYOUT_VERSION = "1"  # bump when the on-disk names or layout change; load_converted refuses other versions
REPORT_NAME = "moefuse.json"
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_SHAPE = (2, 8)  # (batch, tokens) of the probe: 16 tokens route to several experts in every layer


# --------------------------------------------------------------------------------------------- errors

class CheckpointError(MoefuseError):
    """A checkpoint (or a destination) that cannot be converted or loaded. `hint` says what to do."""

    exit_code = 2  # moefuse-convert's exit status: bad input

    def __init__(self, message: str, path: str | os.PathLike | None = None, hint: str = ""):
        self.message, self.path, self.hint = message, None if path is None else str(path), hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


class MissingCheckpoint(CheckpointError):
    """SRC does not exist or is not a directory."""


class BadConfig(CheckpointError):
    """config.json is missing, not valid JSON, or not a transformers config."""


class NoSafetensors(CheckpointError):
    """No safetensors weights in SRC."""


class CorruptSafetensors(CheckpointError):
    """A safetensors file or its index cannot be read."""


class UnsupportedModel(CheckpointError):
    """The model has no MoE layer moefuse.convert serves, or one it cannot serve exactly."""


class MismatchedCheckpoint(CheckpointError):
    """The tensors do not fit the model config.json describes (shapes, missing or unexpected tensors)."""


class DestinationExists(CheckpointError):
    """DST exists already; moefuse-convert never overwrites."""


class BadDestination(CheckpointError):
    """DST cannot be created (its parent is missing, or it lies inside SRC)."""


class NotConverted(CheckpointError):
    """load_converted was pointed at a directory moefuse-convert did not write (or another layout version)."""


class ProbeMismatch(CheckpointError):
    """The converted model's logits differ from the original's beyond the dtype's tolerance."""

    exit_code = 1


# ------------------------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress bar on stderr: `label [#####-----] i/n`. Redrawn in place on a terminal; elsewhere
    (CI logs, captured stderr) it prints at each tenth, so a log shows progress without one line per tensor."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 30):
        self.label, self.total, self.enabled, self.width, self.done = label, max(total, 1), enabled, width, 0
        self._tty = enabled and sys.stderr.isatty()
        self._last_tenth = -1
        self._draw()

    def step(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        tenth = self.done * 10 // self.total
        if not self._tty and tenth == self._last_tenth:
            return
        self._last_tenth = tenth
        fill = self.done * self.width // self.total
        bar = f"{self.label} [{'#' * fill}{'-' * (self.width - fill)}] {self.done}/{self.total}"
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(("\r" + bar + end) if self._tty else bar + "\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------------------- reading SRC

@dataclass
class SourceCheckpoint:
    """A checked SRC: its directory and safetensors files (config.json parsed, each file's header read)."""

    path: Path
    files: list[Path]


def _read_config(path: Path):
    from transformers import AutoConfig

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
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"transformers does not know model_type {raw['model_type']!r}", cfg,
                               "upgrade transformers, or convert a model transformers can load") from e
    except OSError as e:
        raise BadConfig(f"transformers cannot read {cfg}: {e}", cfg, "rewrite it with config.save_pretrained") from e


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


def read_source(src: str | os.PathLike, progress: bool = False) -> SourceCheckpoint:
    """Check SRC before anything heavy runs: the directory, config.json, and every safetensors header."""
    from safetensors import SafetensorError, safe_open

    path = Path(src)
    if not path.is_dir():
        raise MissingCheckpoint(f"checkpoint directory {path} does not exist" if not path.exists()
                                else f"{path} is not a directory", path,
                                "pass the directory save_pretrained wrote (config.json + *.safetensors)")
    _read_config(path)
    files = _weight_files(path)
    bar = Progress("reading shards", len(files), progress)
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):  # opening parses the header and checks it against the size
                pass
        except (SafetensorError, OSError) as e:
            raise CorruptSafetensors(f"{f} cannot be read: {e}", f,
                                     "the file is truncated or damaged: download or copy it again") from e
        bar.step()
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
    except SafetensorError as e:
        raise CorruptSafetensors(f"the weights in {source.path} cannot be read: {e}", source.path,
                                 "a shard is damaged: download or copy it again") from e
    except ValueError as e:
        raise UnsupportedModel(f"transformers cannot build a causal LM from {source.path}: {e}", source.path,
                               "moefuse-convert handles transformers *ForCausalLM MoE checkpoints") from e
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


def _top_k(model, path: str) -> int:
    """K of the router feeding the experts at `path`: its own, its MoE block's or the router's `top_k`."""
    parent = model.get_submodule(path.rpartition(".")[0])
    for m in (model.get_submodule(path), parent, *parent.modules()):
        k = getattr(m, "top_k", None)
        if isinstance(k, int):
            return k
    k = getattr(model.config, "num_experts_per_tok", None)
    if isinstance(k, int):
        return k
    raise UnsupportedModel(f"cannot tell the top-k of the router feeding {path}", path,
                           "moefuse-convert reads it from the router's top_k or config.num_experts_per_tok")


def _converted_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, str], list[dict]]:
    """(tensors to write, tied name → kept name, per-layer report entries)."""
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
        spec = MoESpec.from_key(spec_key(m, w1.dtype, _top_k(model, path)))
        layers.append({"module": path, "tensors": names, "params": _param_names(m),
                       "spec": spec.to_key(), "describe": spec.describe()})
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
    """Write `tensors` as one file or as shards with transformers' index format; return the file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", "moefuse_layout": LAYOUT_VERSION}
    bar = Progress("writing tensors", len(tensors), progress)
    for fname, shard in zip(files, shards):
        save_file(shard, str(dst / fname), metadata=meta)
        bar.step(len(shard))
    if n > 1:
        weight_map = {name: fname for fname, shard in zip(files, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
    return files


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
        return model(ids).logits.float()


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "auto", verify: bool = True,
                       device: str = "cpu", max_shard_bytes: int = 4 << 30, progress: bool = True) -> dict:
    """Convert the transformers checkpoint in `src` to moefuse's layout in a new directory `dst`.

    dtype: "auto" (the checkpoint's) or one of float32/float16/bfloat16, for every tensor written.
    verify: run a probe batch (`PROBE_SHAPE` tokens) through the original model and through
        `load_converted(dst)`, and fail with ProbeMismatch if the logits differ by more than the dtype's
        tolerance (`moefuse.compiler.verify.TOLERANCE`, relative to the largest logit).
    Writes to a temporary directory beside `dst` and renames it into place only when everything (the probe
    included) passed: `dst` either does not exist or is complete. `src` is only read. Returns the report
    (also written to dst/moefuse.json). Raises a CheckpointError subclass on bad input.
    """
    from moefuse.compiler.verify import TOLERANCE
    from moefuse.conversion import convert
    from moefuse.runtime import op as moe_op
    from moefuse.testing import rel_err

    if dtype != "auto" and dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}", None, f"use auto or one of {sorted(_DTYPES)}")
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path.exists():
        raise DestinationExists(f"{dst_path} exists already; moefuse-convert never overwrites", dst_path,
                                "choose a new destination, or remove the old one yourself")
    if not dst_path.parent.is_dir():
        raise BadDestination(f"the parent directory of {dst_path} does not exist", dst_path,
                             f"create {dst_path.parent} first")
    if dst_path.is_relative_to(src_path):
        raise BadDestination(f"{dst_path} lies inside the source checkpoint {src_path}", dst_path,
                             "write the converted checkpoint outside the source directory")
    source = read_source(src_path, progress)

    model = _load_source(source, dtype, progress)
    if verify:
        ids = _probe_ids(model.config, device)
        reference = _logits(model.to(device), ids)
        model.to("cpu")
    summary = convert(model)
    if summary.skipped:
        raise UnsupportedModel(f"moefuse.convert cannot serve every MoE layer of {src_path}:\n{summary}", src_path,
                               "the layers listed are not supported yet; the model runs with transformers as is")
    if not summary.converted:
        raise UnsupportedModel(f"{src_path} ({type(model).__name__}) has no MoE experts module moefuse.convert "
                               "serves", src_path, "moefuse-convert handles transformers MoE models whose experts "
                                                   "use transformers' experts interface (3-D stacked weights)")
    tensors, tied, layers = _converted_tensors(model)
    report = {
        "format": "moefuse-checkpoint", "layout_version": LAYOUT_VERSION, "source": str(src_path),
        "source_files": [f.name for f in source.files],
        "model_type": model.config.model_type, "architecture": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."), "layers": layers, "tied": tied, "probe": None,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.tmp-", dir=dst_path.parent))
    try:
        model.config.save_pretrained(tmp)
        report["copied"] = _copy_side_files(src_path, tmp)
        report["files"] = _write_safetensors(tensors, tmp, max_shard_bytes, progress)
        del tensors, model  # the converted model is rebuilt from tmp, as a user would
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if verify:
            before = moe_op.counters["cpu"] + moe_op.counters["triton"]
            converted = load_converted(tmp, device=device)
            out = _logits(converted, ids)
            calls = moe_op.counters["cpu"] + moe_op.counters["triton"] - before
            tol = TOLERANCE[_DTYPES[report["dtype"]]]
            err = rel_err(out, reference)
            report["probe"] = {"tokens": ids.numel(), "rel_err": err, "tolerance": tol, "fused_calls": calls,
                               "device": device, "ok": err <= tol and calls == len(layers)}
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
            if not report["probe"]["ok"]:
                raise ProbeMismatch(
                    f"the converted model does not match the original on the probe batch: relative error "
                    f"{err:.3g} (tolerance {tol:g}), {calls} fused calls for {len(layers)} layers", dst_path,
                    "please report this with the model's config.json; --no-verify writes it regardless (unsafe)")
        if dst_path.exists():  # created while we worked: never replace it
            raise DestinationExists(f"{dst_path} appeared while converting; moefuse-convert never overwrites",
                                    dst_path, "choose a new destination")
        os.rename(tmp, dst_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["destination"] = str(dst_path)
    log.info("converted %d MoE layer(s) of %s into %s", len(layers), src_path, dst_path)
    return report


# ------------------------------------------------------------------------------------------- loading

def _read_report(path: Path) -> dict:
    rp = path / REPORT_NAME
    if not rp.is_file():
        raise NotConverted(f"{path} has no {REPORT_NAME}: it was not written by moefuse-convert", path,
                           "convert it first: moefuse-convert SRC_DIR DST_DIR; a plain transformers checkpoint "
                           "loads with from_pretrained and then moefuse.convert(model)")
    try:
        report = json.loads(rp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotConverted(f"{rp} is not valid JSON ({e})", rp, "convert the source checkpoint again") from e
    if report.get("format") != "moefuse-checkpoint" or report.get("layout_version") != LAYOUT_VERSION:
        raise NotConverted(f"{rp} describes layout {report.get('layout_version')!r}; this moefuse reads "
                           f"{LAYOUT_VERSION!r}", rp, "convert the source checkpoint again with this moefuse")
    return report


def load_converted(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model moefuse-convert wrote to `path`, ready to run: every MoE layer calls moefuse::moe.

    Returns a transformers *ForCausalLM in eval mode, in the dtype it was converted to, on `device`, already
    through `moefuse.convert`: its experts modules hold the stored w1/w2 (as views in transformers' layout
    where transformers keeps its own module) and call the fused op; compile it with `backend="moefuse"` for
    one fused node per layer. Raises NotConverted, MismatchedCheckpoint or UnsupportedModel when the
    directory does not fit.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from moefuse.conversion import convert
    from moefuse.spec import MoESpec

    path = Path(path)
    if not path.is_dir():
        raise MissingCheckpoint(f"converted checkpoint directory {path} does not exist", path,
                                "pass the DST directory moefuse-convert wrote")
    report = _read_report(path)
    config = _read_config(path)
    with no_init_weights():  # every parameter is overwritten below; random init would only cost time
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[report["dtype"]])
    model.tie_weights()  # done by the init no_init_weights skipped: lm_head = embed_tokens where config ties them
    # Converted first, so that modules convert swaps in (owning w1/w2 themselves) exist to load into
    summary = convert(model)
    fused = _fused_modules(model)
    want = [layer["module"] for layer in report["layers"]]
    if summary.skipped or sorted(fused) != sorted(want):
        raise UnsupportedModel(f"moefuse.convert serves {sorted(fused)} here, the checkpoint was converted for "
                               f"{want}:\n{summary}", path, "convert the source checkpoint again with this moefuse")
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
        stored = MoESpec.from_key(layer["spec"]).activation
        if m._moefuse_activation != stored:
            raise MismatchedCheckpoint(f"{layer['module']}: the model's activation is {m._moefuse_activation}, "
                                       f"the checkpoint was converted for {stored}", path,
                                       "convert the source checkpoint again with this moefuse")
        for short, param in _param_names(m).items():
            t = state.pop(layer["tensors"][short])
            old = getattr(m, param)
            if not _in_op_layout(m) and m.is_transposed and t.dim() == 3:
                t = t.transpose(-2, -1)  # transformers keeps these [E, in, out]: a view of the stored tensor
            if t.shape != old.shape:
                raise MismatchedCheckpoint(f"{layer['module']}.{short} has shape {list(t.shape)}, the model built "
                                           f"from config.json expects {list(old.shape)}", path,
                                           "config.json does not belong to these weights: convert again")
            setattr(m, param, torch.nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad))
            placed.add(f"{layer['module']}.{param}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - placed)
    if missing or unexpected:
        raise MismatchedCheckpoint(f"{path}: tensors missing {missing[:6]}, unexpected {sorted(unexpected)[:6]}",
                                   path, "config.json does not belong to these weights: convert again")
    return model.to(device).eval()
