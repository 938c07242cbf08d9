#!/usr/bin/env bash
# The main job: set up (once) and run the conformance harness with its defaults
# (configuration + CPU tiers on this machine's backends). Extra arguments go to `olmo-attn conformance`.
set -euo pipefail
OLMO_ATTN_EXTRAS="${OLMO_ATTN_EXTRAS:-}" source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV_PY" -m olmo_attn.cli conformance "$@"
