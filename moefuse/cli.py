"""`moefuse-convert SRC_DIR DST_DIR`: a transformers MoE checkpoint, converted once to moefuse's layout.

Exit status: 0 converted (and the probe passed, unless --no-verify); 2 bad input or an environment fault — no
space, a read-only or forbidden destination, a device this machine lacks (one line says what and how to fix
it; nothing was written); 1 the converted model did not match the original on the probe batch (nothing was
written); 3 an internal error (a traceback to report; nothing was written); 130 / 143 interrupted by SIGINT /
SIGTERM (nothing was written, the temporary folder removed). A run killed outright (SIGKILL) leaves a hidden
`.DST.moefuse-tmp-*` folder that the next run for DST removes.
Also runs as `python -m moefuse.cli`. See `moefuse.checkpoint` for the layout written.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback

PROG = "moefuse-convert"


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that the conversion's clean-up runs (its temporary folder goes)."""


def _terminated(signum, frame):
    raise Terminated


def _internal_error() -> int:
    """A bug, not bad input: the traceback, and exit status 3 (never 1, which scripts read as a probe mismatch)."""
    traceback.print_exc()
    print(f"{PROG}: internal error (nothing was written); please report it with the traceback above", file=sys.stderr)
    return 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a size: give 1 MiB or more")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give sizes separated by commas, e.g. 2,9,64") \
            from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be 1 or more")
    return dims


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a transformers MoE checkpoint (config.json + safetensors) to moefuse's layout: "
                    "expert weights stacked per layer as the fused op reads them, a JSON report "
                    "(moefuse.json), and a probe check that the converted model matches the original. "
                    "Load the result with moefuse.load_converted(DST_DIR).")
    p.add_argument("src", metavar="SRC_DIR", help="directory written by save_pretrained (only read)")
    p.add_argument("dst", metavar="DST_DIR", help="new directory to create (never overwritten)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the probe that compares the converted model's logits with the original's")
    p.add_argument("--device", default="cpu", help="device the probe runs on (default: cpu)")
    p.add_argument("--max-shard-size", type=_positive_int, default=4096, metavar="MiB",
                   help="largest safetensors file to write, in MiB (default: 4096)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    custom = p.add_argument_group(
        "models that are not transformers models",
        "SRC holds the model's state_dict as safetensors (one file, or shards with an index); the model is "
        "built as CLASS(**ARGS), loaded, and moefuse.convert run on it. Load the result with "
        "moefuse.load_converted(DST_DIR, model_class='package.module:Class').")
    custom.add_argument("--model-class", metavar="package.module:Class", help="the model's nn.Module class")
    args = custom.add_mutually_exclusive_group()
    args.add_argument("--model-args", metavar="JSON", help="the constructor's keyword arguments, a JSON object")
    args.add_argument("--model-config", metavar="FILE", help="a JSON file holding that object")
    custom.add_argument("--probe-shape", type=_shape, metavar="D0,D1,…",
                        help="shape of the probe input: random floats in the model's dtype (needed unless "
                             "--no-verify)")
    custom.add_argument("--probe-vocab", type=_positive_int, metavar="N",
                        help="make the probe input token ids below N instead of floats")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit status (the console script exits with it)."""
    args = _parser().parse_args(argv)
    from moefuse.checkpoint import convert_checkpoint
    from moefuse.errors import MoefuseError

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        custom = {}
        if args.model_class is not None:
            from moefuse.custom_model import parse_args

            custom = dict(model_class=args.model_class, model_args=parse_args(args.model_args, args.model_config),
                          probe_shape=args.probe_shape, probe_vocab=args.probe_vocab)
        elif args.model_args or args.model_config or args.probe_shape or args.probe_vocab:
            _parser().error("--model-args, --model-config, --probe-shape and --probe-vocab go with --model-class")
        report = convert_checkpoint(args.src, args.dst, dtype=args.dtype, verify=args.verify, device=args.device,
                                    max_shard_bytes=args.max_shard_size << 20, progress=not args.quiet, **custom)
    except MoefuseError as e:
        print(f"{PROG}: error: {getattr(e, 'message', e)}", file=sys.stderr)
        if e.hint:
            print(f"{PROG}: hint: {e.hint}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in ("transformers", "safetensors", "huggingface_hub", "tqdm"):
            return _internal_error()
        print(f"{PROG}: error: {e.name} is not installed; moefuse-convert needs it", file=sys.stderr)
        print(f"{PROG}: hint: pip install 'moefuse[convert]'", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a file system, a device), not a bug: one line, no traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{PROG}: interrupted (nothing was written)", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
    except Exception:  # a bug, not bad input: 3, so that scripts never read it as a probe mismatch (1)
        return _internal_error()
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"{PROG}: {len(report['layers'])} MoE layer(s) of {report['architecture']} converted to "
          f"{report['destination']} ({report['dtype']}, {len(report['files'])} file(s))")
    for layer in report["layers"]:
        print(f"  {layer['module']}: {layer['describe']}")
    for module, why in report.get("skipped", {}).items():
        print(f"  {module}: left as it is: {why}")
    probe = report["probe"]
    if probe is None:
        print("  probe: skipped (--no-verify): load it with moefuse.load_converted(DST, allow_unverified=True)")
    else:
        print(f"  probe: {probe['tokens']} tokens, relative error {probe['rel_err']:.3g} <= {probe['tolerance']:g}, "
              f"{probe['fused_calls']} fused calls on {probe['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
