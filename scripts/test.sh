#!/usr/bin/env bash
# The test suite: set up (once) with the dev and peer extras, lint, then run every test
# (unit tests, then the conformance cases collected by pytest) on all cores.
set -euo pipefail
OLMO_ATTN_EXTRAS="${OLMO_ATTN_EXTRAS:-dev,peer}" source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$VENV_PY" -m ruff check .
"$VENV_PY" -m ruff format --check .
exec "$VENV_PY" -m pytest -n auto -q --timeout 600 tests conformance "$@"
