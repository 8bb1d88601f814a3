#!/usr/bin/env bash
# Downloads (here, where the package index is reachable) the wheels pipeline/gpu_check.sh installs
# on a machine that has a CUDA build of torch and torchvision but no index: the project's other
# dependencies, for CPython 3.12 on x86-64 Linux (the GPU machine's Python), into DIR.
#   bash pipeline/gpu_wheels.sh [DIR]     (default REPO/.whl, ignored by git; ~11 MB)
# Versions: the ones this project is tested with. Everything else they need (numpy, packaging,
# typing-extensions, pyyaml, click, pillow, tqdm) is on that machine already.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$REPO/.whl}
PY=${PYTHON:-$(command -v python3 || command -v python)}
PYVER=${GPU_WHEELS_PYTHON:-3.12}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" zarr==3.1.6 numcodecs==0.16.6 pcodec==1.1.0 google-crc32c==1.9.0 pycocotools==2.0.11 \
  donfig==0.8.1.post1
ls -1 "$DIR"
