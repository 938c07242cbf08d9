#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh: a virtual environment in .venv with a CPU
# PyTorch (or the machine's own PyTorch when one is already importable, e.g. on a GPU host), and
# this package installed editable with the extras named in $OLMO_ATTN_EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
have_torch() { "$1" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 10) else 1)' 2>/dev/null; }
if have_torch "$PY" && [ -z "${OLMO_ATTN_FORCE_VENV:-}" ] && [ "${OLMO_ATTN_USE_SYSTEM:-auto}" != "no" ] && "$PY" -c 'import torch; import sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # A GPU host with its own CUDA PyTorch: use it as is (no network there).
    VENV_PY=$PY
    "$VENV_PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv
    fi
    VENV_PY=$PWD/.venv/bin/python
    "$VENV_PY" -m pip install -q --upgrade pip >/dev/null
    # The CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
    have_torch "$VENV_PY" || "$VENV_PY" -m pip install -q torch==2.13.0
    "$VENV_PY" -m pip install -q -e ".${OLMO_ATTN_EXTRAS:+[$OLMO_ATTN_EXTRAS]}"
fi
export VENV_PY
