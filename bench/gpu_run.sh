#!/usr/bin/env bash
# The GPU check in one command: install the carried wheels (bench/gpu_wheels.sh) with no index, keep whatever
# PYTHONPATH is set, then bench/gpu_check.py: its preflight (which stops in seconds, naming the carry list, when a
# module the wheels bring is missing), then the parts, writing gpu.json, gpu-run.log and stages.log under $OUT as each
# number comes. Arguments go to gpu_check.py. RLHF_GPU_WHEELS names another wheel folder (default bench/.wheels).
#   OUT=/tmp/out bash bench/gpu_run.sh                      # on a GPU machine
#   OUT=/tmp/out bash bench/gpu_run.sh --device cpu --tiny  # the CPU rehearsal
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/metrics/gpu}
mkdir -p "$OUT"
export OUT
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
RLHF_GPU_WHEELS=${RLHF_GPU_WHEELS:-$ROOT/bench/.wheels}
wheels=$RLHF_GPU_WHEELS/$tag
RLHF_GPU_WHEELS_INSTALLED=0
site=${RLHF_GPU_SITE:-$(mktemp -d /tmp/rlhf-site.XXXXXX)}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  # no index, no dependency resolution, no retries: what is carried is what gets installed
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --retries 0 --target "$site" "$wheels"/*.whl >>"$OUT/gpu-run.log" 2>&1; then
    echo "installing $wheels failed (the end of $OUT/gpu-run.log says why)" | tee -a "$OUT/gpu-run.log"
    tail -n 20 "$OUT/gpu-run.log"
    exit 1
  fi
  RLHF_GPU_WHEELS_INSTALLED=$(ls "$wheels"/*.whl | wc -l)
  echo "installed $RLHF_GPU_WHEELS_INSTALLED carried wheels ($tag) into $site" | tee -a "$OUT/gpu-run.log"
else
  echo "no carried wheels for $tag in $wheels (bench/gpu_wheels.sh); the preflight checks what this Python has" | tee -a "$OUT/gpu-run.log"
fi
export RLHF_GPU_WHEELS RLHF_GPU_WHEELS_INSTALLED
export PYTHONPATH="$ROOT:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" "$ROOT/bench/gpu_check.py" --out "$OUT" "$@"
