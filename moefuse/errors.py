"""Errors raised by moefuse. Each names the problem and the fix.

    MoefuseError                    every error moefuse raises on purpose (`hint`: what to do)
    ├── OptionsError                a backend option (or its environment variable) is unknown or bad
    ├── InputError                  a tensor passed to the fused op does not fit its MoESpec
    ├── ConversionError             `moefuse.convert` was called on something it cannot take
    └── CheckpointError             moefuse-convert / load_converted: bad input or a faulty environment
        ├── MissingCheckpoint, BadConfig, NoSafetensors, CorruptSafetensors, AlreadyConverted   (SRC)
        ├── UnsupportedModel, MismatchedCheckpoint, NonFiniteSource, BadModelClass, BadModelArgs (the model)
        ├── DestinationExists, BadDestination, DestinationUnwritable                            (DST)
        ├── BadDevice
        ├── NotConverted, BadReport, UnverifiedCheckpoint                                       (loading)
        └── ProbeMismatch           the converted model does not match the original (exit status 1)

`moefuse-convert` prints a `CheckpointError` as one line (and its hint) and exits with its `exit_code`
(2 unless said otherwise); anything else is a bug: exit 3 with the traceback.
"""
from __future__ import annotations

import os


class MoefuseError(Exception):
    """Base class of every error moefuse raises on purpose."""

    hint: str = ""


class OptionsError(MoefuseError, ValueError):
    """An option passed to the backend (or read from its environment variable) is unknown or has a bad value."""


class InputError(MoefuseError, ValueError):
    """A tensor passed to the fused op does not fit its MoESpec (shape, dtype, device, a bias the spec does not
    have): the message names the tensor, what the spec expects and what was given."""


class ConversionError(MoefuseError, ValueError):
    """`moefuse.convert` was given something it cannot convert at all (not a module, a bad argument). A single
    MoE module it cannot serve is not an error: it is left as it is and listed in the summary with why."""

    def __init__(self, message: str, hint: str = ""):
        self.message, self.hint = message, hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


# ----------------------------------------------------------------------------------- checkpoints

class CheckpointError(MoefuseError):
    """A checkpoint (or a destination, or the machine) that cannot be converted or loaded. `hint` says what
    to do; `path` is the file or directory concerned, when there is one."""

    exit_code = 2  # moefuse-convert's exit status: bad input, or an environment fault the user can fix

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


class AlreadyConverted(CheckpointError):
    """SRC was written by moefuse-convert: it is converted already."""


class UnsupportedModel(CheckpointError):
    """The model has no MoE layer moefuse.convert serves, or one it cannot serve exactly."""


class MismatchedCheckpoint(CheckpointError):
    """The tensors do not fit the model config.json describes (shapes, missing or unexpected tensors)."""


class NonFiniteSource(CheckpointError):
    """The source model's own weights (hence its logits) hold NaN or inf: there is nothing to compare with."""


class DestinationExists(CheckpointError):
    """DST exists already; moefuse-convert never overwrites."""


class BadDestination(CheckpointError):
    """DST cannot be created (its parent is missing, or it lies inside SRC)."""


class DestinationUnwritable(CheckpointError):
    """Writing beside DST failed: a read-only file system, no space left, no permission (the OS's reason)."""


class BadDevice(CheckpointError):
    """The device asked for does not exist, or this machine does not have it."""


class NotConverted(CheckpointError):
    """load_converted was pointed at a directory moefuse-convert did not write (or another layout version)."""


class BadReport(NotConverted):
    """moefuse.json is there but does not follow its schema, or disagrees with config.json or the tensors."""


class UnverifiedCheckpoint(CheckpointError):
    """The converted folder's probe never ran (written with --no-verify): loading it needs allow_unverified."""


class ProbeMismatch(CheckpointError):
    """The converted model's logits differ from the original's beyond the dtype's tolerance."""

    exit_code = 1


class BadModelClass(CheckpointError):
    """--model-class (load_converted's model_class) does not name an importable torch.nn.Module class, or not
    the one the converted folder was written for."""


class BadModelArgs(CheckpointError):
    """--model-args / --model-config is not a JSON object of the model class's constructor arguments."""
