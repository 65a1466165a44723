#!/bin/sh
# The GPU smoke test on a lent GPU machine (its own Python with torch, transformers, peft and accelerate;
# no package registry, no Ray): install the carried wheels beside the repository, run the script.
#
#   sh infra/gpu-smoke.sh PYTHON WHEELS_DIR [ARGS...]     # make gpu-smoke, there
#   sh infra/gpu-smoke.sh --proof                         # make gpu-smoke-proof, here: its dry run in a venv
#                                                         # of only those packages and the wheels
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--proof" ]; then
  proof=.venv-gpu-proof
  test -x $proof/bin/python || python3 -m venv $proof
  .venv/bin/python -m uv pip install --quiet --python $proof/bin/python torch==2.11.0 transformers==5.17.0 peft accelerate
  sh infra/gpu-wheels.sh .venv/bin/python .gpu-wheels-proof 3.11
  rm -rf .gpu-site
  exec sh infra/gpu-smoke.sh $proof/bin/python .gpu-wheels-proof --dry-run
fi
python=$1
wheels=$2
shift 2
$python -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade --target .gpu-site \
  "$wheels"/*.whl
PYTHONPATH=.gpu-site:.:platform exec $python -m jobs.perf.gpu_smoke "$@"
