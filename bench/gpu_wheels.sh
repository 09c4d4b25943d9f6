#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (bench/gpu_check.py WHEELS: pydantic, TRL 1.12 and what it imports,
# rouge-score and nltk), for x86_64 Linux, into bench/.wheels/cp312 (the GPU machine's Python) and
# bench/.wheels/cp311 (the CPU rehearsal's, same versions); git-ignored, carried along with the checkout.
# dvc is not carried: bench/gpu_run.sh runs the stage scripts in dvc.yaml's order without it.
#   bash bench/gpu_wheels.sh          # here, with the package index reachable; prints the carried tree's size
#   bash bench/gpu_wheels.sh 3.12     # only the GPU machine's wheels
#   bash bench/gpu_wheels.sh image    # bench/.image-wheels: the GPU image's transformers and huggingface-hub (and
#                                     # httpx, which that hub needs) for the rehearsal's venv; never carried
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ "${1:-}" = image ]; then
  read -r -a IMAGE <<< "$("$PY" -c 'import ast; t = ast.parse(open("gpu_check.py").read())
print(" ".join(next(ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "IMAGE_WHEELS")))')"
  mkdir -p .image-wheels
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest .image-wheels "${IMAGE[@]}"
  echo ".image-wheels: $(ls .image-wheels | wc -l) wheels, $(du -sh .image-wheels | cut -f1)"
  exit 0
fi
read -r -a PACKAGES <<< "$("$PY" -c 'import ast, sys; t = ast.parse(open("gpu_check.py").read())
v = {n.targets[0].id: ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("WHEELS", "SDIST_WHEELS")}
print(" ".join(v["WHEELS"]), "|", " ".join(v["SDIST_WHEELS"]))')"
BINARY=() SOURCE=() seen=0
for p in "${PACKAGES[@]}"; do
  if [ "$p" = "|" ]; then seen=1; elif [ $seen = 0 ]; then BINARY+=("$p"); else SOURCE+=("$p"); fi
done
VERSIONS=("$@"); [ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.12 3.11)
for version in "${VERSIONS[@]}"; do
  tag=cp${version/./}
  dest=.wheels/$tag
  mkdir -p "$dest"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$dest" \
    --python-version "$version" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${BINARY[@]}"
  # pure-Python source archives: one wheel serves every version
  ls "$dest"/rouge_score-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$dest" "${SOURCE[@]}"
  echo "$dest: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
done
# What a device run carries: the tracked and untracked-not-ignored files plus bench/.wheels (the limit is 64 MiB).
cd ..
bytes=$( { git ls-files -co --exclude-standard -z; find bench/.wheels -type f -print0; } | du -cb --files0-from=- | tail -1 | cut -f1)
echo "carried tree with bench/.wheels: $((bytes / 1048576)) MiB ($bytes bytes; the limit is 64 MiB)"
