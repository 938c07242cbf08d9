#!/usr/bin/env bash
# The detached queue of the H200 lease of 2026-12-03 (fourth session): started by r7_b.sh
# (QUEUE=r9_queue.sh) in ~/olmo; logs and results in ~/r7, brought back by r7_poll.sh.
#   A. at once, in the background: the --full gpu tier for torch + flash_4 from an empty compile
#      cache (#12's 30-minute target), sharing the GPU and the cores with B, so its wall time is an
#      upper bound of a run alone;
#   B. once Transformer Engine is installed (r9_te.sh: carried core + the extension built on the
#      lease before): the quick gpu tier for te beside torch and flash_4, to completion;
#   C. when A is done and time is left: te's documents speed beside its raw call (backend_bench).
# QUEUE_SECONDS: the whole budget.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
queue_init 1250
rm -rf /tmp/full_cc /tmp/te_cc
fc=$(( total - 40 ))
( step "$fc" full.log python3 -m conformance --no-progress --tier gpu --full --backends torch flash_4 --jobs auto \
    --compile-cache /tmp/full_cc --time-budget $(( fc - 60 )) --json "$R/NVIDIA_H200-full.json" \
    --markdown "$R/NVIDIA_H200-full.md" --junit "$R/NVIDIA_H200-full.xml" > "$R/full.step" 2>&1
  queue_note "full done: $(head -1 "$R/full.step")" ) &
full=$!
while [ ! -f ~/te_site/te_env.sh ] && [ $(( total - SECONDS )) -gt 300 ]; do sleep 3; done
if [ -f ~/te_site/te_env.sh ]; then
  queue_note "te installed: $(cat ~/seed/te/status 2>/dev/null)"
  c=$(queue_cap 900 60)
  ( source ~/te_site/te_env.sh
    step "$c" te_conf.log python3 -m conformance --no-progress --tier gpu --backends te torch flash_4 --jobs 2 \
      --compile-cache /tmp/te_cc --time-budget $(( c - 90 )) --json "$R/NVIDIA_H200-te.json" \
      --markdown "$R/NVIDIA_H200-te.md" --junit "$R/NVIDIA_H200-te.xml" > "$R/te.step" 2>&1 )
  queue_note "te tier done: $(head -1 "$R/te.step")"
else
  queue_note "te not installed: $(cat ~/seed/te/status 2>/dev/null)"
fi
wait "$full"
c=$(queue_cap 120 15)
if [ -f ~/te_site/te_env.sh ] && [ "$c" -gt 60 ]; then
  ( source ~/te_site/te_env.sh
    TAIL=14 step "$c" backends.log python3 benchmarks/backend_bench.py --backends te,flash_4 --masks documents \
      --seq-lens 8192,32768 --out "$R/backends-docs.json" --markdown "$R/backends-docs.md" )
  queue_note "backend_bench documents done"
fi
queue_note "queue done"
touch "$R/done"
