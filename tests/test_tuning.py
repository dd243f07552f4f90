"""Autotuning (`moefuse.runtime.tuning`): the key's M bucket, the on-disk cache, its failure modes, the switch,
and the op choosing its config through it on the interpreter."""
from __future__ import annotations

import json

import pytest
import torch
from test_kernels import TOLERANCES, Case, make_problem, reference_moe

from moefuse.kernels.grouped_gemm import GemmConfig
from moefuse.runtime import op, tuning

SPACE = tuning.ConfigSpace(block_m=(16, 32), block_n=(32,), block_k=(32,), num_warps=(4,), num_stages=(1,))
FAST = GemmConfig(32, 32, 32, 4, 1)  # the config the fake timer below calls fastest


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty tuning cache and no configs remembered by this process."""
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_chosen", {})
    return tmp_path / "tuning"


class FakeLayer:
    """A layer whose `run(config)` records the configs it ran and whose `timer` says FAST is 1 ms, others 2 ms."""

    def __init__(self):
        self.ran: list[GemmConfig] = []

    def run(self, config):
        self.ran.append(config)

    def timer(self, fn):
        fn()
        return 1.0 if self.ran[-1] == FAST else 2.0


def choose(layer: FakeLayer, T: int, spec=None, dtype=torch.float16):
    spec = spec or make_problem(Case(T=1, K=2, E=4, H=32, I=32), torch.float32)[0]
    x = torch.zeros(T, spec.hidden, dtype=dtype)
    ids = torch.zeros(T, spec.top_k, dtype=torch.int64)
    return tuning.gemm_config(spec, x, ids, layer.run, space=SPACE, timer=layer.timer)


def test_m_bucket():
    assert [tuning.m_bucket(m) for m in (0, 1, 2, 3, 17, 32, 33, 4096, 4097)] == [1, 1, 2, 4, 32, 32, 64, 4096, 8192]


def test_new_token_count_in_the_same_bucket_never_retunes(monkeypatch, fresh_cache):
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    layer = FakeLayer()
    assert choose(layer, T=9) == FAST  # M = T·K = 18: bucket 32, tuned over the 2 configs
    assert len(layer.ran) == 2 and len(list(fresh_cache.iterdir())) == 1
    for T in (10, 13, 16):  # M = 20, 26, 32: same bucket, no run at all
        assert choose(layer, T=T) == FAST
    assert len(layer.ran) == 2
    monkeypatch.setattr(tuning, "_chosen", {})  # a new process: read back from disk, not re-tuned
    assert choose(layer, T=12) == FAST and len(layer.ran) == 2
    choose(layer, T=17)  # M = 34: bucket 64 is tuned (and stored) on its own
    assert len(layer.ran) == 4 and len(list(fresh_cache.iterdir())) == 2


def test_key_names_everything_that_changes_the_best_config():
    spec = make_problem(Case(T=1, K=2, E=4, H=32, I=32), torch.float32)[0]
    other = make_problem(Case(T=1, K=2, E=4, H=32, I=32, layout="plain"), torch.float32)[0]
    key = tuning.tuning_key(spec, torch.device("cpu"), 18)
    assert (key.num_experts, key.n, key.k, key.dtype, key.m_bucket) == (4, 32, 32, "float32", 32)
    assert key.triton and key.device and len(key.spec) == 16
    assert tuning.tuning_key(spec, torch.device("cpu"), 30) == key  # M in the same bucket: the same key
    names = {tuning.tuning_key(s, torch.device("cpu"), m).filename for s, m in ((spec, 18), (spec, 33), (other, 18))}
    assert len(names) == 3


def test_atomic_cache_round_trip(fresh_cache):
    key = tuning.tuning_key(make_problem(Case(T=1, K=2, E=4, H=32, I=32), torch.float32)[0], torch.device("cpu"), 8)
    path = tuning.store(key, FAST, {"(32, 32, 32, 4, 1)": 1.0})
    assert path.parent == fresh_cache and tuning.load(key) == FAST
    assert [p.name for p in fresh_cache.iterdir()] == [path.name]  # the temp file was renamed, not left behind
    assert json.loads(path.read_text())["key"]["m_bucket"] == 8


def test_corrupt_cache_file_is_ignored_with_a_warning(monkeypatch, fresh_cache):
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    layer = FakeLayer()
    choose(layer, T=9)
    (path,) = fresh_cache.iterdir()
    for garbage in ('{"format": 1, "key": {}, "conf', '{"format": 1, "key": {}, "config": {}}', "[]"):
        path.write_text(garbage)  # truncated; another key's; not an object
        monkeypatch.setattr(tuning, "_chosen", {})
        with pytest.warns(UserWarning, match=r"ignoring the tuning cache file .* MOEFUSE_AUTOTUNE=0 turns tuning off"):
            assert choose(layer, T=9) == FAST  # re-tuned ...
        assert tuning.load(tuning.tuning_key(make_problem(Case(T=1, K=2, E=4, H=32, I=32), torch.float32)[0],
                                             torch.device("cpu"), 18)) == FAST  # ... and rewritten whole


@pytest.mark.parametrize("setting", ["0", None])
def test_tuning_off_by_env_and_by_default_on_cpu(setting, monkeypatch, fresh_cache):
    # MOEFUSE_AUTOTUNE=0, or unset on a CPU tensor (the interpreter): the default config, nothing run or written.
    if setting is None:
        monkeypatch.delenv("MOEFUSE_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("MOEFUSE_AUTOTUNE", setting)
    layer = FakeLayer()
    assert choose(layer, T=9) == GemmConfig.default(torch.float16)
    assert layer.ran == [] and not fresh_cache.exists()


def test_empty_batch_is_never_tuned(monkeypatch, fresh_cache):
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    layer = FakeLayer()
    assert choose(layer, T=0) == GemmConfig.default(torch.float16) and layer.ran == []


def test_op_tunes_on_the_interpreter_when_asked(monkeypatch, fresh_cache):
    # moefuse::moe with MOEFUSE_AUTOTUNE=1 under TRITON_INTERPRET=1: the real timer over INTERPRETER_SPACE, one
    # file written, the same numbers as the reference; a second call in the bucket reads the choice back.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    spec, act, args = make_problem(Case(T=8, K=2, E=4, H=32, I=32), torch.float32)
    before = op.counters["triton"]
    y = op.moe_call(spec, *args)
    assert op.counters["triton"] == before + 1
    (path,) = fresh_cache.iterdir()
    data = json.loads(path.read_text())
    assert data["key"]["device"] == "interpreter" and data["key"]["m_bucket"] == 16
    assert len(data["timings_ms"]) == len(tuning.INTERPRETER_SPACE.configs(torch.float32, 2, 16)) == 2
    torch.testing.assert_close(y.double(), reference_moe(*args, act, spec.activation.slices, 32),
                               **TOLERANCES[torch.float32])
    mtime = path.stat().st_mtime_ns
    op.moe_call(spec, *make_problem(Case(T=7, K=2, E=4, H=32, I=32), torch.float32)[2])  # M = 14: same bucket
    assert path.stat().st_mtime_ns == mtime and len(list(fresh_cache.iterdir())) == 1


def test_token_rounding_tiles_never_straddle_the_rounded_counts(monkeypatch):
    # Token rounding makes every expert's rows a multiple of tile_m: tuned or default, the M-tile must divide it.
    import dataclasses

    spec = dataclasses.replace(make_problem(Case(T=1, K=2, E=4, H=32, I=32), torch.float32)[0], tile_m=16)
    layer = FakeLayer()
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "0")
    assert choose(layer, T=40, spec=spec).block_m == 16 and not layer.ran  # the default's 64 rows, clamped
    monkeypatch.setenv("MOEFUSE_AUTOTUNE", "1")
    assert choose(layer, T=40, spec=spec).block_m == 16
    assert layer.ran and all(c.block_m == 16 for c in layer.ran)  # the 32-row config is never tried


def test_second_stage_offers_the_persistent_grid_and_tma_only_where_they_exist():
    tile = GemmConfig(64, 64, 64, 4, 3)
    persistent = [c.persistent for c in tuning.schedule_variants(tile, torch.bfloat16, 80)]
    assert persistent == [True]  # sm_80: no TMA
    hopper = tuning.schedule_variants(tile, torch.bfloat16, 90)
    assert [(c.persistent, c.tma, c.block_m) for c in hopper] == [(True, False, 64), (True, True, 64)]
    assert [c.tma for c in tuning.schedule_variants(tile, torch.float32, 90)] == [False]  # fp32 TMA spills
    assert tuning.schedule_variants(hopper[0], torch.bfloat16, 90) == []
