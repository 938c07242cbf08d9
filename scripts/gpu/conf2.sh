#!/usr/bin/env bash
# Device call right after conf1.sh on the same machine: install flash-attn-4, then its GPU
# conformance tier beside the torch backend (pairwise; the inductor cache of conf1 makes torch cheap).  carry: .carry/fa4_2 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
bash .carry/fa4_2/fa4_install.sh ~/fa4_stash ~/fa4_site > "$OUT/fa4_install.log" 2>&1 || cat "$OUT/fa4_install.log"
source ~/fa4_site/env.sh
fla_site
export PYTHONWARNINGS=ignore::UserWarning
TAIL=40 step 290 conf_gpu_flash4.log python3 -m conformance --tier gpu --backends flash_4 torch --time-budget 230 \
  --json "$OUT/conf_gpu_flash4.json"
