#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh (sourced; sets VENV_PY).
#
# * A GPU host whose python3 already has a CUDA PyTorch >= 2.10: that interpreter is used as it is,
#   with the repository on PYTHONPATH (nothing is installed; such hosts often have no network).
# * Otherwise: a virtual environment in .venv, a PyTorch in it (torch==2.13.0 unless one >= 2.10 is
#   there; $OLMO_ATTN_TORCH_INDEX_URL picks the index, e.g. https://download.pytorch.org/whl/cpu for
#   the small CPU build), and this package installed editable with the extras in $OLMO_ATTN_EXTRAS.
#   The installation happens once: .venv/.olmo-attn-setup records a hash of pyproject.toml and the
#   extras installed; a later call with the same pyproject.toml and no new extras installs nothing.
#   pip's output goes to .venv/setup.log and is shown only when the installation fails.
#
# Environment: PYTHON (interpreter to start from, default python3), OLMO_ATTN_EXTRAS (comma-separated
# extras), OLMO_ATTN_FORCE_VENV=1 (use .venv even on a GPU host), OLMO_ATTN_TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

have_torch() {
    "$1" -c 'import sys, torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if v >= (2, 10) else 1)' 2>/dev/null
}
have_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if [ -z "${OLMO_ATTN_FORCE_VENV:-}" ] && have_torch "$PY" && have_cuda "$PY"; then
    VENV_PY=$(command -v "$PY")
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    VENV_PY=$PWD/.venv/bin/python
    STAMP=.venv/.olmo-attn-setup
    LOG=.venv/setup.log
    # the extras asked for, one per line, sorted; "" = none
    want=$(printf '%s' "${OLMO_ATTN_EXTRAS:-}" | tr ', ' '\n\n' | sed '/^$/d' | sort -u)
    key="pyproject=$(sha256sum pyproject.toml | cut -c1-16)"
    have=""
    if [ -x "$VENV_PY" ] && [ -f "$STAMP" ] && [ "$(head -n 1 "$STAMP")" = "$key" ]; then
        have=$(tail -n +2 "$STAMP")
    fi
    missing=$(comm -23 <(printf '%s\n' "$want" | sed '/^$/d') <(printf '%s\n' "$have" | sed '/^$/d'))
    if [ ! -f "$STAMP" ] || [ "$(head -n 1 "$STAMP")" != "$key" ] || [ -n "$missing" ] || [ ! -x "$VENV_PY" ]; then
        echo "olmo-attn: setting up .venv (once; pip's log: $LOG) ..." >&2
        [ -x "$VENV_PY" ] || "$PY" -m venv .venv
        all=$(printf '%s\n%s\n' "$have" "$want" | sed '/^$/d' | sort -u)
        extras=$(printf '%s' "$all" | paste -sd, -)
        {
            if ! have_torch "$VENV_PY"; then
                "$VENV_PY" -m pip install --disable-pip-version-check \
                    ${OLMO_ATTN_TORCH_INDEX_URL:+--index-url "$OLMO_ATTN_TORCH_INDEX_URL"} torch==2.13.0
            fi
            "$VENV_PY" -m pip install --disable-pip-version-check -e ".${extras:+[$extras]}"
        } >"$LOG" 2>&1 || {
            echo "olmo-attn: set-up failed; the last lines of $LOG:" >&2
            tail -n 30 "$LOG" >&2
            exit 1
        }
        printf '%s\n%s\n' "$key" "$all" | sed '/^$/d' >"$STAMP"
    fi
fi
export VENV_PY
