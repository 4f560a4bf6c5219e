#!/usr/bin/env bash
# Create the virtual environment and install wanserve into it.
#   scripts/install.sh [--dev] [VENV_DIR]
# torch is installed first and on its own: on a CPU machine `torch==2.13.0` is the local CPU wheel;
# letting pip resolve torch through our requirements would pull a multi-GB CUDA build instead.
# Set WANSERVE_TORCH to choose another torch (e.g. a CUDA build on a GPU box); an already
# installed torch that satisfies the requirement is kept.
set -euo pipefail
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; shift; fi
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install --quiet "${WANSERVE_TORCH:-torch==2.13.0}"
fi
"$py" -m pip install --quiet -e ".${extras}"
"$py" -c "import torch, diffusers, wanserve; print('wanserve', wanserve.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
