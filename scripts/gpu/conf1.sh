#!/usr/bin/env bash
# Device call (one GPU): stash flash-attn-4 part one, then the GPU conformance tier for the torch
# backend and flash-linear-attention, bounded by a time budget.  carry: .carry/fa4_1 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
fla_site
TAIL=40 step 560 conf_gpu_torch.log python3 -m conformance --tier gpu --backends torch fla --time-budget 480 \
  --json "$OUT/conf_gpu_torch.json"
