#!/usr/bin/env bash
# Device call F, right after x2_e.sh: install flash-attn-4 and re-run the gpu tier for flash_4 beside
# torch (6 shards over both GPUs; chunks c-gpu-*) after the KV-cache and pairwise-floor fixes.
# carry: .carry/fa4_2 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
fa4_site
export PYTHONWARNINGS=ignore::UserWarning
TAIL=20 step 300 conformance_d.log env OUT=/tmp/conf CHUNK_PREFIX=c- PARALLEL_SKIP="host multigpu" \
  GPU_ARGS="--backends flash_4 torch" bash conformance/gpu_run.sh parallel 6 --time-budget 250
tar -czf "$OUT/conf_chunks_c.tgz" -C /tmp/conf chunks
exit 0
