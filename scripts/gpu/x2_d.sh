#!/usr/bin/env bash
# Device call D, right after x2_c.sh on the same machine: install flash-attn-4, then the second half
# of `--tier all`: the gpu tier for flash_4 beside torch (pairwise) in 6 shards and the flash_4
# multigpu tier (chunks b-*), merged with call C's chunks into one report.  carry: .carry/fa4_2 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
fa4_site
fla_site
export PYTHONWARNINGS=ignore::UserWarning
python3 -c "import flash_attn.cute; print('flash_attn.cute OK')"
TAIL=20 step 340 conformance_b.log env OUT=/tmp/conf CHUNK_PREFIX=b- PARALLEL_SKIP=host \
  GPU_ARGS="--backends flash_4 torch" MULTIGPU_ARGS="--backends flash_4" bash conformance/gpu_run.sh parallel 6 --time-budget 275
tar -czf "$OUT/conf_chunks_b.tgz" -C /tmp/conf chunks
cp /tmp/conf/*.json /tmp/conf/*.md /tmp/conf/*.xml "$OUT/" 2>/dev/null
exit 0
