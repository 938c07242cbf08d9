#!/usr/bin/env bash
# H200 lease of 2026-12-03, call 4, on the warm machine of r4_a-c (flash_2 / flash_3 / flash-attn-4
# installed there): which `cutlass` Python package wins, then the gpu tier for every attention
# backend that imports, in one run (pairwise across all of them), into one merged report.
#   run(command="bash scripts/gpu/r4_d.sh", timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
source ~/fa3_site/seed_env.sh
source ~/fa4_site/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONFAULTHANDLER=1
fla_site
python3 -c "import cutlass, cutlass.cute as c; print(cutlass.__file__, hasattr(c.core, 'ThrMma'))" 2>&1 | tail -2
be="torch flash_2 flash_3 flash_4"
python3 -c "import flash_attn.cute" 2>&1 | tail -1 || be="torch flash_2 flash_3"
stem=$OUT/NVIDIA_H200-gpu-merged
TAIL=60 step 500 merged.log python3 -m conformance --no-progress --tier gpu --backends $be --jobs auto \
  --compile-cache ~/cc --time-budget 470 --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
