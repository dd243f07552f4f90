"""Autotuning of the grouped GEMMs' launch config (`GemmConfig`), cached on disk.

    config = gemm_config(spec, x, topk_ids, run)   # run(config) runs the layer once with that config

The layer's tile config is chosen once per (E, N, K, dtype, device name, Triton version, spec hash) and
power-of-two bucket of M = T·K (the routed rows) — never the exact M, so a new token count in a known bucket
neither re-tunes nor compiles anything new. The winner is written to
`$MOEFUSE_CACHE_DIR/tuning/<key hash>.json` (default `~/.cache/moefuse/tuning`, the kernel cache's root, see
`moefuse.kernels.codegen.cache_dir`) through a temp file and `os.replace`, so a concurrent process reads the
old file or the new one, never half of one. An unreadable or mismatched file is ignored with a warning and
re-tuned. The start of each tuning is logged on the "moefuse.tuning" logger at WARNING (it costs seconds of
compiles), each config timed at INFO.

Environment: MOEFUSE_AUTOTUNE=1 tunes, =0 uses `GemmConfig.default(dtype)`; unset, tuning is on for CUDA
tensors and off on the CPU (under TRITON_INTERPRET=1, where timings mean nothing). Tuning never runs while a
CUDA graph is being captured (it synchronises): the cached config, else the default, is used there.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing

from moefuse.kernels.codegen import write_atomic, cache_dir
from moefuse.kernels.grouped_gemm import GemmConfig, device_capability
from moefuse.spec import MoESpec

log = logging.getLogger("moefuse.tuning")

ENV = "MOEFUSE_AUTOTUNE"
_FORMAT = 1  # bump when the file layout changes: older files are then re-tuned, not misread
_SHARED_LIMIT = 227 * 1024  # bytes of shared memory per block on sm_90 (sm_80: 163 KiB, checked by the kernel build)


# ---------------------------------------------------------------------------------------------------------
# The config space
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigSpace:
    """The GemmConfigs tried: every combination of the values below that fits (`configs`)."""

    block_m: tuple[int, ...]
    block_n: tuple[int, ...]
    block_k: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]

    def configs(self, dtype: torch.dtype, num_inputs: int, m_bucket: int) -> list[GemmConfig]:
        """The combinations whose pipelined tiles fit in shared memory: A tile plus num_inputs weight tiles per
        stage. BLOCK_M values beyond the bucket (rounded up to 64, one wgmma warpgroup) are dropped: their
        tiles would be mostly masked rows."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        largest_m = max(64, m_bucket)
        found = []
        for bm, bn, bk, warps, stages in itertools.product(self.block_m, self.block_n, self.block_k,
                                                           self.num_warps, self.num_stages):
            shared = (bm * bk + num_inputs * bn * bk) * itemsize * stages
            if bm <= largest_m and shared <= _SHARED_LIMIT:
                found.append(GemmConfig(bm, bn, bk, warps, stages))
        return found


# fp16/bf16 on Hopper: 64- and 128-row tiles (one or two wgmma warpgroups), 3-4 stages of cp.async.
HALF_SPACE = ConfigSpace(block_m=(64, 128), block_n=(64, 128), block_k=(64,), num_warps=(4, 8), num_stages=(3, 4))
# fp32 ("ieee", FMA): the default's shape and its neighbours; larger tiles spill the fp32 accumulators.
FLOAT_SPACE = ConfigSpace(block_m=(32, 64), block_n=(64,), block_k=(32,), num_warps=(4, 8), num_stages=(2, 3))
# Under TRITON_INTERPRET=1 (tests only): two configs, each a few interpreter runs of a tiny layer.
INTERPRETER_SPACE = ConfigSpace(block_m=(16, 32), block_n=(32,), block_k=(32,), num_warps=(4,), num_stages=(1,))


def default_space(dtype: torch.dtype, device: torch.device) -> ConfigSpace:
    if device.type != "cuda":
        return INTERPRETER_SPACE
    return FLOAT_SPACE if dtype == torch.float32 else HALF_SPACE


# ---------------------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------------------


def m_bucket(m: int) -> int:
    """The power of two >= m (>= 1) that tuning results are stored under."""
    return triton.next_power_of_2(max(1, m))


@dataclass(frozen=True)
class TuningKey:
    """What a tuned config depends on. n, k: the up GEMM's output columns (I) and reduction (H); the down GEMM
    is the same pair transposed, and the spec hash covers everything else about the layer."""

    num_experts: int
    n: int
    k: int
    dtype: str
    device: str
    triton: str
    spec: str  # sha256 of MoESpec.to_key(), 16 hex digits
    m_bucket: int

    @property
    def filename(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32] + ".json"


@functools.lru_cache(maxsize=None)
def _spec_hash(spec_key: str) -> str:
    return hashlib.sha256(spec_key.encode()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuning_key(spec: MoESpec, device: torch.device, m: int) -> TuningKey:
    return TuningKey(num_experts=spec.num_experts, n=spec.intermediate, k=spec.hidden, dtype=spec.dtype,
                     device=device_name(device), triton=triton.__version__, spec=_spec_hash(spec.to_key()),
                     m_bucket=m_bucket(m))


# ---------------------------------------------------------------------------------------------------------
# The cache on disk
# ---------------------------------------------------------------------------------------------------------


def tuning_dir() -> Path:
    """$MOEFUSE_CACHE_DIR/tuning, default ~/.cache/moefuse/tuning: beside the generated kernels."""
    return cache_dir().parent / "tuning"


def load(key: TuningKey) -> GemmConfig | None:
    """The cached config for `key`, or None. A file that cannot be read back as this key's config is ignored
    with a warning (and overwritten by the next tuning)."""
    path = tuning_dir() / key.filename
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if data.get("format") != _FORMAT or data.get("key") != dataclasses.asdict(key):
            raise ValueError("written for another key or format")
        return GemmConfig(**data["config"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        warnings.warn(f"moefuse: ignoring the tuning cache file {path} ({type(exc).__name__}: {exc}); the layer "
                      f"is tuned again and the file rewritten. {ENV}=0 turns tuning off.", stacklevel=2)
        return None


def store(key: TuningKey, config: GemmConfig, timings_ms: dict[str, float]) -> Path:
    """Write `config` for `key` atomically; returns the file."""
    path = tuning_dir() / key.filename
    data = {"format": _FORMAT, "key": dataclasses.asdict(key), "config": dataclasses.asdict(config),
            "timings_ms": timings_ms}
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Choosing a config
# ---------------------------------------------------------------------------------------------------------


def enabled(device: torch.device) -> bool:
    """MOEFUSE_AUTOTUNE=1/0 wins; unset, tune on CUDA only."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        warnings.warn(f"moefuse: {ENV}={value!r} is not 0 or 1; using the default (tune on CUDA only).",
                      stacklevel=3)
    return device.type == "cuda"


def time_ms(run: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of `run()`: triton's do_bench on CUDA; one warm-up and three timed calls elsewhere."""
    if device.type == "cuda":
        return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")
    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


# Chosen configs of this process by (tuning directory, key): after the first call of a bucket, no disk access.
_chosen: dict[tuple[Path, TuningKey], GemmConfig] = {}


def tune(key: TuningKey, configs: Sequence[GemmConfig], run: Callable[[GemmConfig], object],
         timer: Callable[[Callable[[], object]], float]) -> GemmConfig:
    """Time `run(config)` for each config, store and return the fastest. A config that fails to launch (too
    many registers or too much shared memory for this GPU) is skipped; if none runs, the last error is raised
    as it came (a bad input is a ValueError from the launch's checks, whatever the config)."""
    timings: dict[str, float] = {}
    best, best_ms, error = None, float("inf"), None
    for i, config in enumerate(configs, 1):
        try:
            ms = timer(functools.partial(run, config))
        except Exception as exc:  # a resource error of one config must not stop the layer from running
            error = exc
            log.info("tuning %s: config %d/%d %s failed: %s", key, i, len(configs), config, exc)
            continue
        timings[str(dataclasses.astuple(config))] = ms
        log.info("tuning %s: config %d/%d %s: %.4f ms", key, i, len(configs), config, ms)
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        if error is not None:
            raise error
        raise ValueError(f"moefuse: the tuning space for {key} is empty; {ENV}=0 turns tuning off")
    path = store(key, best, timings)
    log.info("tuned %s: %s (%.4f ms), written to %s", key, best, best_ms, path)
    return best


def schedule_variants(config: GemmConfig, dtype: torch.dtype, capability: int | None) -> list[GemmConfig]:
    """Tuning's second stage: the winning tile on a persistent, L2-grouped grid, and with TMA weight loads where
    they can exist (sm_90+, fp16/bf16; elsewhere the host would fall back to the same pointer-load kernel).
    Both are off by default until measured on a GPU; timing them here lets each layer take them when they win,
    at two more compiles instead of doubling the space."""
    if config.persistent:
        return []
    variants = [dataclasses.replace(config, persistent=True)]
    if dtype != torch.float32 and capability is not None and capability >= 90:
        variants.append(dataclasses.replace(config, persistent=True, tma=True))
    return variants


def within_tile(config: GemmConfig, spec: MoESpec) -> GemmConfig:
    """With token rounding every expert's row count is a multiple of spec.tile_m; an M-tile no taller than it
    (both powers of two, so it divides it) never computes a partial tile."""
    if spec.tile_m and config.block_m > spec.tile_m:
        return dataclasses.replace(config, block_m=spec.tile_m)
    return config


def gemm_config(spec: MoESpec, x: torch.Tensor, topk_ids: torch.Tensor, run: Callable[[GemmConfig], object], *,
                space: ConfigSpace | None = None,
                timer: Callable[[Callable[[], object]], float] | None = None) -> GemmConfig:
    """The GemmConfig for this layer call: tuned or cached when tuning is enabled, else the default.

    run(config): one forward of the layer with `config` (its result is discarded). space/timer: the configs
    to try (default `default_space`) and how to time one (default `time_ms`), for tests."""
    dtype = x.dtype
    if topk_ids.numel() == 0 or not enabled(x.device):
        return within_tile(GemmConfig.default(dtype), spec)  # an empty batch launches nothing: nothing to time
    key = tuning_key(spec, x.device, topk_ids.numel())
    memo = (tuning_dir(), key)
    config = _chosen.get(memo)
    if config is None:
        config = load(key)
        if config is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                # timing syncs, which capture forbids; tuned on a later eager call
                return within_tile(GemmConfig.default(dtype), spec)
            configs = (space or default_space(dtype, x.device)).configs(dtype, spec.activation.num_inputs,
                                                                        key.m_bucket)
            configs = [c for c in configs if not spec.tile_m or c.block_m <= spec.tile_m] or [
                within_tile(GemmConfig.default(dtype), spec)]
            # Once per layer shape and M bucket per machine, but seconds of compiles: say so where it shows
            log.warning("moefuse: tuning the GEMM config of %s over %d configs (cached in %s; %s=0 turns it off)",
                        key, len(configs), tuning_dir(), ENV)
            timer = timer or functools.partial(time_ms, device=x.device)
            config = tune(key, configs, run, timer)
            variants = schedule_variants(config, dtype, device_capability(x.device)) if x.is_cuda else []
            if variants:
                config = tune(key, [config, *variants], run, timer)
        _chosen[memo] = config
    return config
