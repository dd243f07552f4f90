#!/usr/bin/env bash
# The one device check a session lent a GPU runs: the GPU lane (`pytest -m gpu`), then benchmarks/gpu.py at
# the headline shapes (SonicMoE's, Qwen3-30B-A3B's, decode T = 1 … 64), everything under one folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]                  default: gpu_check/<UTC time> in the repository
#
# OUT_DIR receives environment.txt, lane.log, lane.xml (junit), bench.log, bench.json, bench.md (markdown
# table) and summary.md (what ran, how it ended). Budget on one H100 from a cold Triton cache: the lane is cut
# at MOEFUSE_LANE_LIMIT seconds (default 240), the benchmark at MOEFUSE_BENCH_LIMIT (default 240) — under 8
# minutes in all; the benchmark rewrites its JSON and table after every shape, so a cut run keeps what it
# measured. Exit status: 0 when the lane passed and the benchmark finished, else 1.
#
# Needs no network and no install: python (PYTHON, default python3) with CUDA torch, triton, transformers and
# pytest; moefuse is taken from this checkout (PYTHONPATH). Where pytest is missing, the pure-Python wheels
# carried in benchmarks/wheels/ (pytest 9.2.0, pluggy, iniconfig, pygments: `pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d benchmarks/wheels pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
# pygments==2.21.0`) are installed into OUT_DIR/site (pip --no-index --target), never into the system.
#
# MOEFUSE_GPU_REHEARSAL=1 rehearses the same script on a CPU: the lane's tests that are not CUDA-only run with
# the Triton kernels on the interpreter at tiny sizes, the benchmark with --tiny --compiler eager
# (tests/test_gpu_check.py, in CI).
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-python3}
LANE_LIMIT=${MOEFUSE_LANE_LIMIT:-240}
BENCH_LIMIT=${MOEFUSE_BENCH_LIMIT:-240}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MOEFUSE_GPU_LANE=1  # tests/conftest.py: leave TRITON_INTERPRET to this script (real kernels on a GPU)
if [ "${MOEFUSE_GPU_REHEARSAL:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--tiny --compiler eager)
else
  unset TRITON_INTERPRET
  BENCH_ARGS=()
fi

# ---- pytest, from carried wheels if the machine lacks it ----
if ! "$PY" -c "import pytest" 2>/dev/null; then
  if compgen -G "$ROOT/benchmarks/wheels/*.whl" >/dev/null; then
    # --no-deps: packaging, pytest's one other dependency, comes with transformers
    "$PY" -m pip install --quiet --no-deps --no-index --target "$OUT/site" "$ROOT"/benchmarks/wheels/*.whl \
      && export PYTHONPATH="$PYTHONPATH:$OUT/site"
  fi
fi

# ---- The machine ----
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  "$PY" - <<'EOF'
import platform, torch, triton, transformers
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  "
      f"transformers {transformers.__version__}")
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (rehearsal on the CPU)")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} >"$OUT/environment.txt" 2>&1

# ---- 1. The GPU lane ----
start=$(date +%s)
timeout -k 10 "$LANE_LIMIT" "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_shared.py -q -rs --durations=15 -p no:cacheprovider \
  --junitxml "$OUT/lane.xml" >"$OUT/lane.log" 2>&1
lane_rc=$?
lane_s=$(( $(date +%s) - start ))

# ---- 2. The benchmark at the headline shapes ----
start=$(date +%s)
timeout -k 10 "$BENCH_LIMIT" "$PY" benchmarks/gpu.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --json "$OUT/bench.json" \
  --markdown "$OUT/bench.md" >"$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

verdict() {  # rc, limit
  case $1 in 0) echo "passed";; 124|137) echo "cut at its ${2} s limit";; *) echo "failed (exit $1)";; esac
}
{
  echo "# moefuse GPU check"
  echo
  echo '```'
  cat "$OUT/environment.txt"
  echo '```'
  echo
  echo "- lane (\`pytest -m gpu\`): $(verdict $lane_rc "$LANE_LIMIT") in ${lane_s} s — $(grep -E "(passed|failed|error)" "$OUT/lane.log" | tail -n 1)"
  echo "- benchmark (benchmarks/gpu.py ${BENCH_ARGS[*]}): $(verdict $bench_rc "$BENCH_LIMIT") in ${bench_s} s"
  echo
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
[ $lane_rc = 0 ] && [ $bench_rc = 0 ]
