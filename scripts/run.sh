#!/usr/bin/env bash
# The main job: set up (once) and run the conformance harness with its defaults
# (configuration, CPU and multi-process tiers; + GPU tiers where CUDA is present). Extra arguments go to
# `olmo-attn conformance`.
set -euo pipefail
OLMO_ATTN_EXTRAS="${OLMO_ATTN_EXTRAS:-}" source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV_PY" -m olmo_attn.cli conformance "$@"
