#!/usr/bin/env bash
# Create the virtual environment and install wanserve into it.
#   scripts/install.sh [--dev] [VENV_DIR]
# torch is installed first and on its own, so that WANSERVE_TORCH decides which build: letting pip resolve torch
# through our requirements could pull a newer multi-GB CUDA build.
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
  # Unquoted on purpose: WANSERVE_TORCH may carry pip options, e.g.
  # WANSERVE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet ${WANSERVE_TORCH:-torch==2.13.0}
fi
"$py" -m pip install --quiet -e ".${extras}"
"$py" -c "import torch, diffusers, wanserve; print('wanserve', wanserve.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
