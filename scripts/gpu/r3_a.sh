#!/usr/bin/env bash
# H200 lease of 2026-12-02 (evening), call 1 of 3 (<= 9.5 min):
#   - stash flash-attn-4 part one (.carry/fa4_1) for call 2 (scripts/fa4/README.md)
#   - the flash_3 subset build (scripts/flash3/build.sh) detached on cores 3-15 (~280 s)
#   - meanwhile on cores 0-2: the containment family on CUDA for the torch backend, the gdn family
#   - FA3 installed into ~/fa3_site; its wheel parts back in $OUT (carry them next time)
#   - scripts/flash3/probe.py (one FA3 configuration per process) and the flash_3 gpu tier in 4 shards
#     with PYTHONFAULTHANDLER=1 (a segfault prints the Python stack)
#   run(command="bash scripts/gpu/r3_a.sh", carry=[".carry/fa4_1", ".carry/seed", ".carry/wheels"], timeout_s=600)
# Logs and JSON are packed into $OUT/r3_a.tgz (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r3_a
source scripts/gpu/lib.sh
t0=$SECONDS
pack() { tar -czf "$final/r3_a.tgz" -C "$OUT" . ; echo "call: $((SECONDS - t0)) s"; }
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
SEED_BUILDS=fa3 FA3_JOBS=14 taskset -c 3-15 bash scripts/seed/lease1_start.sh > "$OUT/fa3_start.log" 2>&1
tail -n 6 "$OUT/fa3_start.log"
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
TAIL=30 step 130 containment.log taskset -c 0-2 python3 -m conformance --no-progress --tier gpu --backends torch \
  -k containment --json "$OUT/containment.json"
TAIL=30 step 150 gdn_conf.log taskset -c 0-2 python3 -m conformance --no-progress --tier gpu -k gdn \
  --json "$OUT/gdn_conf.json" --time-budget 130
while [ ! -f ~/seed/fa3/status ] && [ $((SECONDS - t0)) -lt 380 ]; do sleep 5; done
tail -n 4 ~/seed/fa3/progress.log; cat ~/seed/fa3/status 2>/dev/null || echo "fa3 build still running after $((SECONDS - t0)) s"
cp ~/seed/fa3/progress.log "$OUT/fa3_progress.log" 2>/dev/null
if grep -q '^ok' ~/seed/fa3/status 2>/dev/null; then
  cp ~/seed/fa3/parts/* "$final/"
  bash scripts/seed/lease2_install.sh ~/fa3_site ~/seed/fa3/parts > "$OUT/fa3_install.log" 2>&1
  source ~/fa3_site/seed_env.sh
  TAIL=40 step 100 fa3_probe.log python3 scripts/flash3/probe.py --timeout 45 --jobs 8
  left=$(( 560 - (SECONDS - t0) ))
  if [ "$left" -gt 60 ]; then
    OUT_CONF=/tmp/conf_fa3
    TAIL=15 step "$left" fa3_conf.log env OUT=$OUT_CONF PARALLEL_SKIP="host multigpu" bash conformance/gpu_run.sh \
      parallel 4 --backends torch flash_3 -k flash_3 --time-budget $(( left - 45 ))
    cp $OUT_CONF/chunks/*.log "$OUT/" 2>/dev/null; cp $OUT_CONF/*.json "$OUT/fa3_conformance.json" 2>/dev/null
  fi
fi
pack
