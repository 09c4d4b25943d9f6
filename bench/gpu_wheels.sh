#!/usr/bin/env bash
# Wheels the GPU machine lacks, for CPython 3.12 on x86_64 Linux, into bench/.wheels (git-ignored) to carry there:
# pydantic (our params; the image has torch, transformers, peft, safetensors, pandas, pyarrow, pyyaml) and, for
# `bench/gpu_check.py --trl`, TRL 1.12 with what it imports that the image lacks (gpu_check.TRL_PACKAGES, no deps:
# gpu_check installs them into bench/.trl-site, a folder only the TRL process imports from).
#   bash bench/gpu_wheels.sh            # here, with network access to PyPI
#   pip install --no-index --find-links bench/.wheels pydantic pyyaml   # there; gpu_check --trl installs TRL itself
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PLATFORM=(--python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --only-binary=:all:)
"$PY" -m pip download --quiet --dest .wheels "${PLATFORM[@]}" pydantic pyyaml
read -r -a TRL <<< "$("$PY" -c 'import gpu_check; print(" ".join(gpu_check.TRL_PACKAGES))')"
"$PY" -m pip download --quiet --dest .wheels "${PLATFORM[@]}" --no-deps "${TRL[@]}"
du -sh .wheels
ls .wheels
