#!/bin/sh
# The wheels `make gpu-smoke` carries to a lent GPU machine, whose own Python has torch, transformers,
# peft and accelerate but no package registry: DeepSpeed built here as a pure-Python wheel (its CUDA ops
# build at run time, and the smoke test's optimizer is torch's), then what DeepSpeed and our imports need
# besides (pydantic, Pillow, ...), at the versions this project tests with, for the target's Python, and
# the torchvision of the target's torch (transformers 5.17's AutoImageProcessor needs it).
#
#   sh infra/gpu-wheels.sh PYTHON OUT_DIR [TARGET_PYTHON_VERSION [TORCHVISION_VERSION]]
#   sh infra/gpu-wheels.sh .venv/bin/python .gpu-wheels 3.12 0.26.0   # make gpu-wheels (torch 2.11 there)
set -eu
python=$1
out=$2
target=${3:-3.12}
torchvision=${4:-0.26.0}
cd "$(dirname "$0")/.."
rm -rf "$out"
mkdir -p "$out"
pins=$($python -m pip freeze --disable-pip-version-check 2>/dev/null | grep -iE \
  '^(einops|hjson|msgpack|ninja|py-cpuinfo|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|pillow)==')
$python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$out" \
  "$($python -m pip freeze --disable-pip-version-check 2>/dev/null | grep -i '^deepspeed==')"
# shellcheck disable=SC2086 # one argument per pin
$python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$target" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out" $pins "torchvision==$torchvision"
ls "$out"
du -sh "$out"
