#!/bin/sh
# The install steps of the project, run by `make install` (into .venv/) and by infra/Dockerfile
# (into the image's /opt/venv), so the laptop, CI and the cluster install the same way:
#
#   sh infra/install.sh [--deps-only | --project-only] PYTHON EXTRAS [TORCH_INDEX_URL]
#   sh infra/install.sh .venv/bin/python test                                            # make: everything
#   sh infra/install.sh --deps-only /opt/venv/bin/python server https://download.pytorch.org/whl/cu128  # image
#   sh infra/install.sh --project-only /opt/venv/bin/python server                          # image, after the code
#
# Torch goes in first with pip, at the pin read from pyproject.toml (the one place pins live), from
# TORCH_INDEX_URL when given (CPU or CUDA wheels), so that DeepSpeed's source build finds it. The
# rest goes in with uv (pinned there too): it downloads and builds in parallel, ~10 s instead of
# pip's ~3 minutes on 2 cores, and keeps the torch that is already installed.
# --deps-only reads nothing but pyproject.toml (the image's dependency layer survives code changes);
# --project-only installs the project itself, without its dependencies.
set -eu
step=all
case ${1:-} in
  --deps-only) step=deps; shift ;;
  --project-only) step=project; shift ;;
esac
python=$1
extras=$2
torch_index=${3:-}
cd "$(dirname "$0")/.."
# pin NAME: the project's own requirement on NAME (its dependencies or an extra), as written in pyproject.toml
pin() { python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
print(next(r for r in p['dependencies'] + sum(p['optional-dependencies'].values(), [])
           if r.split('==')[0].split('[')[0] == sys.argv[1]))" "$1"; }
pip="$python -m pip install --quiet --disable-pip-version-check"
# --no-build-isolation: deepspeed is an sdist whose build needs torch; an isolated build
# environment would download the newest CUDA torch instead of using the pinned one.
# --compile-bytecode: every Ray worker is a fresh Python process that imports torch, transformers,
# DeepSpeed, Ray Data and MLflow; without .pyc files (uv writes none by default, and where
# PYTHONDONTWRITEBYTECODE is set nothing ever writes them) each one compiles those from source
# again: 12 s instead of 7 s to import a training worker's modules on 2 cores.
uv="$python -m uv pip install --quiet --python $python --no-build-isolation --compile-bytecode"
if [ "$step" = project ]; then
  $uv --no-deps -e .
  exit 0
fi
$pip "setuptools>=69" wheel "$(pin uv)"
$pip ${torch_index:+--index-url "$torch_index"} "$(pin torch)"
if [ "$step" = deps ]; then
  $uv -r pyproject.toml --extra "$extras"
else
  $uv -e ".[$extras]"
fi
