"""Checkpoints of models that are not transformers MoE models: `moefuse-convert --model-class pkg.mod:Class`.

Such a checkpoint is a folder of safetensors files (one, or shards with an index) holding the model's
`state_dict()`; the model is rebuilt as `Class(**model_args)` (`--model-args JSON`, or `--model-config FILE`
holding that JSON object), its weights loaded, and `moefuse.convert` run on it: whatever MoE forms it finds
(a user's block with a router Linear and a ModuleList of expert MLPs, an experts container called as
`experts(x, ids, weights)`, …) are converted and the rest is reported as skipped. The probe needs an input
the model takes: `--probe-shape 2,9,32` (random floats in the model's dtype) or, with `--probe-vocab N`,
token ids below N.

A converted folder records the class's name and arguments; `load_converted(path, model_class=Class)` imports
nothing by itself: the caller names the class, and it must be the recorded one.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from moefuse.errors import BadModelArgs, BadModelClass, CorruptSafetensors, MismatchedCheckpoint, UnsupportedModel


def class_name(cls: type) -> str:
    """`package.module:Qualified.Name`, the form --model-class takes."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(name: str | type) -> type:
    """The nn.Module class `name` (`package.module:Class`) names; a class is returned as it is."""
    if isinstance(name, type):
        cls = name
    else:
        module, sep, qualname = str(name).partition(":")
        if not sep or not module or not qualname:
            raise BadModelClass(f"--model-class takes package.module:Class, got {name!r}", None,
                                "e.g. --model-class mypkg.model:MoETransformer")
        try:
            cls = importlib.import_module(module)
        except ImportError as e:
            raise BadModelClass(f"cannot import {module!r} for --model-class {name}: {e}", None,
                                "install the package that defines it, or put its folder on PYTHONPATH") from e
        for part in qualname.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                raise BadModelClass(f"{module!r} has no {qualname!r}", None, "check the class's name and module")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BadModelClass(f"{name} is not a torch.nn.Module class", None, "name the model's nn.Module class")
    return cls


def parse_args(text: str | None = None, file: str | None = None) -> dict:
    """The constructor's keyword arguments, from JSON text or a JSON file (at most one of them)."""
    if text is not None and file is not None:
        raise BadModelArgs("give --model-args or --model-config, not both", None, "keep one of them")
    where = "--model-args"
    if file is not None:
        where = str(file)
        try:
            text = Path(file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BadModelArgs(f"cannot read the model config {file}: {e}", file, "pass a JSON file") from e
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadModelArgs(f"{where} is not valid JSON ({e})", None,
                           'give a JSON object of the constructor\'s arguments, e.g. \'{"dim": 64}\'') from e
    if not isinstance(args, dict):
        raise BadModelArgs(f"{where} is a JSON {type(args).__name__}, not an object", None,
                           'give a JSON object of the constructor\'s arguments, e.g. \'{"dim": 64}\'')
    return args


def build(cls: type, args: dict) -> nn.Module:
    """`cls(**args)`; a constructor that refuses the arguments is the user's to fix, not a moefuse bug."""
    try:
        return cls(**args)
    except TypeError as e:
        raise BadModelArgs(f"{class_name(cls)}(**{args}) raised TypeError: {e}", None,
                           "--model-args / --model-config must hold the constructor's keyword arguments") from e
    except Exception as e:  # noqa: BLE001 - the user's constructor: anything it raises is about its arguments
        raise UnsupportedModel(f"{class_name(cls)}(**{args}) raised {type(e).__name__}: {e}", None,
                               "check the constructor's arguments") from e


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Load every tensor of `files` into `model`. Missing, unexpected or wrongly shaped tensors are an error;
    a name safetensors' `save_model` left out because it shares storage with a kept one (tied weights) is
    not missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state |= load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CorruptSafetensors(f"{f} cannot be read: {e}", f, "copy or download it again") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise MismatchedCheckpoint(f"the tensors do not fit {class_name(type(model))}: "
                                   f"{str(e).strip().splitlines()[-1].strip()}", None,
                                   "--model-args must describe the model these weights were saved from") from e
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded = {params[n].data_ptr() for n in state if n in params}
    missing = [n for n in missing if n not in params or params[n].data_ptr() not in loaded]
    if missing or unexpected:
        raise MismatchedCheckpoint(f"the tensors do not fit {class_name(type(model))}: missing {missing[:6]}, "
                                   f"unexpected {sorted(unexpected)[:6]}", None,
                                   "--model-args must describe the model these weights were saved from")


def probe_input(shape: tuple[int, ...], vocab: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if vocab is not None:
        return torch.randint(0, vocab, shape, generator=gen).to(device)
    return torch.randn(shape, generator=gen).to(device, dtype)


def output_tensor(out) -> torch.Tensor:
    """The tensor a model's output is compared on: the output itself, its `.logits`, or its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedModel(f"the model returned {type(out).__name__}: no tensor to compare on the probe", None,
                           "the probe compares a tensor output (or .logits, or the first of a tuple); "
                           "--no-verify skips it")
