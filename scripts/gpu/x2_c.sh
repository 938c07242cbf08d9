#!/usr/bin/env bash
# Device call C on a 2-GPU machine: stash flash-attn-4 part one for call D, then the first half of
# `--tier all` side by side: the gpu tier for torch and fla in 6 shards over both GPUs, the host tiers
# and the torch multigpu tier (chunks a-*).  carry: .carry/fa4_1 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
fla_site
export PYTHONWARNINGS=ignore::UserWarning
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TAIL=20 step 330 conformance_a.log env OUT=/tmp/conf CHUNK_PREFIX=a- GPU_ARGS="--backends torch fla" \
  MULTIGPU_ARGS="--backends torch" bash conformance/gpu_run.sh parallel 6 --time-budget 265
tar -czf "$OUT/conf_chunks_a.tgz" -C /tmp/conf chunks
cp /tmp/conf/*.json /tmp/conf/*.md "$OUT/" 2>/dev/null
exit 0
