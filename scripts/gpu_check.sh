#!/usr/bin/env bash
# The prepared check for a lent GPU machine (the library's `device` tool):
# installs the carried wheels, runs the GPU-relevant tests, benchmarks the
# GPU recipe, and trains configs/vit.py to completion, printing throughput,
# wall time and balanced test accuracy. Budget: 10 minutes of device time.
#
# Here, once (needs ../shared/data and pip):   scripts/gpu_check.sh prepare
#   -> .gpu/wheels/*.whl (what the GPU image lacks: ml_collections, clu, aqtp) and
#      .gpu/data.tar.gz (the course data, JPEG, ~37 MiB: the device tool carries
#      at most 64 MiB); .gpu/ is git-ignored.
# There (the device tool's run, carry=['.gpu']):  scripts/gpu_check.sh
# Anywhere, as a dry run on a tiny config:
#   GPU_CHECK_CONFIG=configs/vit.py:smoke GPU_CHECK_TESTS=tests/test_vit.py \
#     scripts/gpu_check.sh
# Files land in $OUT (the device tool's folder), else ./gpu_check_out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "prepare" ]]; then
  mkdir -p .gpu/wheels
  # Pure-Python wheels, valid for the GPU image's Python 3.12.
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation py --platform any \
    -d .gpu/wheels ml_collections clu aqtp
  tar -C "${VITJAX_DATA_ROOT:-../shared/data}" -czf .gpu/data.tar.gz \
    CIFAR10_imbalanced CIFAR10_balanced
  du -sh .gpu/*
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
CONFIG=${GPU_CHECK_CONFIG:-configs/vit.py}
TESTS=${GPU_CHECK_TESTS:-tests/test_vit.py tests/test_sparse_models.py tests/test_losses.py}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [[ -d .gpu/wheels ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/vitjax-site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/vitjax-site:$PWD:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
DATA=${VITJAX_DATA_ROOT:-}
if [[ -z "$DATA" && -f .gpu/data.tar.gz ]]; then
  DATA=/tmp/vitjax-data
  mkdir -p "$DATA" && tar -C "$DATA" -xzf .gpu/data.tar.gz
fi
DATA=${DATA:-./data}
export VITJAX_DATA_ROOT=$DATA

"$PY" - <<'EOF'
import jax
print('jax', jax.__version__, 'devices', jax.devices())
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

echo "== tests: $TESTS"
start=$SECONDS
"$PY" -m pytest -q -x -p no:cacheprovider $TESTS
echo "tests took $((SECONDS - start)) s"

echo "== benchmark: $CONFIG"
"$PY" scripts/benchmark.py --config="$CONFIG" --input=device --repeats=3 \
  --config.data.root="$DATA" --config.data.cache_dir=/tmp/vitjax-cache \
  --seconds=3

echo "== full recipe: $CONFIG"
start=$SECONDS
"$PY" -m vitjax.main --config="$CONFIG" --workdir="$OUT/vit" \
  --config.data.root="$DATA" --config.data.cache_dir=/tmp/vitjax-cache \
  --config.data.pipeline=device
echo "full recipe wall time $((SECONDS - start)) s"
"$PY" - "$OUT/vit/eval/report_best.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"balanced test accuracy {r['test']['balanced_accuracy']:.4f}, "
      f"top-1 {r['test']['accuracy']:.4f}, training {r['train_seconds']:.0f} s")
EOF
