#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, transformers, peft, safetensors, pandas, pyarrow; not pydantic), for
# CPython 3.12 on x86_64 Linux, into bench/.wheels (git-ignored) to carry there:
#   bash bench/gpu_wheels.sh            # here, with network access to PyPI
#   pip install --no-index --find-links bench/.wheels pydantic pyyaml   # there
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip download --quiet --dest .wheels --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --only-binary=:all: pydantic pyyaml
du -sh .wheels
ls .wheels
