#!/usr/bin/env bash
# The detached queue of the second H200 machine of 2026-12-03 (third session; the first was taken
# back, idle, after compile_bench, with Transformer Engine built): started by r7_b.sh
# (QUEUE=r8_queue.sh) in ~/olmo; logs and results in ~/r7, brought back by r7_poll.sh.
#   1. Gated DeltaNet at the long-T shapes with and without filling the SMs (TILES["fill_sms"]),
#      while Transformer Engine builds (r7_te.sh);
#   2. once built: TE's kernel choice (scripts/te/probe.py), the quick gpu tier for te beside torch
#      and flash_4, then benchmarks/backend_bench.py for te, torch, flash_4 (adapters, raw calls);
#   3. the --full gpu tier for torch + flash_4 from a cold compile cache with what is left.
# QUEUE_SECONDS: the whole budget.
# Ran (15:47 UTC, QUEUE_SECONDS=800): GDN fill on/off 170 s (h200-2026-12-03-gdn-fill-{on,off}.log),
# TE built in 171 s; its te tier started before te_env.sh existed and ran without TE: stopped and
# re-run by r8_fix.sh (te tier cut by its step timeout at 322 s and, before the harness fix, left no
# report; backend_bench 96 s: h200-2026-12-03-backends-te.*). --full did not run (no time left).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
queue_init 900
TAIL=30 step 100 gdn_fill.log python3 benchmarks/gdn_bench.py --sections triton_speed --shapes 32k FlashQLA \
  --budget 90 --out "$R/gdn-fill-on.json"
TAIL=30 step 70 gdn_nofill.log python3 benchmarks/gdn_bench.py --sections triton_speed --shapes 32k \
  --set fill_sms=0 --budget 60 --out "$R/gdn-fill-off.json"
queue_note "gdn fill done"
while { [ ! -f ~/seed/te/status ] || { grep -q "^ok" ~/seed/te/status && [ ! -f ~/te_site/te_env.sh ]; }; } && [ $(( total - SECONDS )) -gt 300 ]; do sleep 3; done
if grep -q '^ok' ~/seed/te/status 2>/dev/null; then
  queue_note "te built: $(cat ~/seed/te/status)"
  source ~/te_site/te_env.sh
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 step 90 te_probe.log python3 scripts/te/probe.py
  queue_note "te probe done"
  c=$(queue_cap 360 150)
  step "$c" te_conf.log python3 -m conformance --no-progress --tier gpu --backends te torch flash_4 --jobs auto \
    --time-budget $(( c - 30 )) --json "$R/NVIDIA_H200-te.json" --markdown "$R/NVIDIA_H200-te.md" --junit "$R/NVIDIA_H200-te.xml"
  queue_note "te tier done"
  TAIL=14 step "$(queue_cap 140 20)" backends.log python3 benchmarks/backend_bench.py --backends te,torch,flash_4 \
    --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$R/backends.json" --markdown "$R/backends.md"
  queue_note "backend_bench done"
else
  queue_note "te build not ok: $(cat ~/seed/te/status 2>/dev/null)"
fi
c=$(queue_cap 1000 10)
if [ "$c" -gt 60 ]; then
  step "$c" full.log python3 -m conformance --no-progress --tier gpu --full --backends torch flash_4 --jobs auto \
    --compile-cache /tmp/full_cc --time-budget $(( c - 30 )) --json "$R/NVIDIA_H200-full.json" \
    --markdown "$R/NVIDIA_H200-full.md" --junit "$R/NVIDIA_H200-full.xml"
  queue_note "full done (time-budgeted: see its report)"
fi
queue_note "queue done"
touch "$R/done"
