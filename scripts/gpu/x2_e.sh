#!/usr/bin/env bash
# Device call E on a 2-GPU machine: stash flash-attn-4 part one for call F, and re-run the multigpu
# Gated DeltaNet case whose whole-layer budget was fixed after call C (chunk c-multigpu).
# carry: .carry/fa4_1 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
export PYTHONWARNINGS=ignore::UserWarning
TAIL=6 step 120 conformance_c.log env OUT=/tmp/conf bash conformance/gpu_run.sh run c-multigpu --tier multigpu \
  --backends torch -k gdn --time-budget 100
cp /tmp/conf/chunks/c-multigpu.json "$OUT/"
exit 0
