#!/bin/bash
# GPU machine, lease 1 (same warm machine as lease1_start.sh): wait for the builds, bring the wheels back.
#
#   run(command="bash scripts/seed/lease1_collect.sh 540", timeout_s=600)
#   run(command="bash scripts/seed/lease1_collect.sh 0 8", timeout_s=60)   # parts 9.. if > 8 in all
#
# Waits up to WAIT seconds (default 540) for both builds (WORK/status), printing their progress
# every 30 s, then copies the wheel parts (fa2.tar.xz.partNN, fa3.tar.xz.partNN; at most 8 files
# per call, skipping the first SKIP) to $OUT. Exit status 0 when both built and every part came
# back in this call, 2 when parts are left for another call, 3 when a build is unfinished or failed.
# A build still running at the end of the wait has its objects packed (fa2/fa3.objs.tar.xz.partNN,
# returned the same way) so that a later machine resumes it instead of starting over (lease1_start.sh,
# SEED_OBJS); SEED_PARTIAL=0 skips that. Call 2 (SKIP > 0) reuses the pieces call 1 packed.
set -uo pipefail
root=${SEED_ROOT:-$HOME/seed}
wait_s=${1:-540}
skip=${2:-0}
t0=$(date +%s)
done_both() { [ -f "$root/fa2/status" ] && [ -f "$root/fa3/status" ]; }
while ! done_both && [ $(( $(date +%s) - t0 )) -lt "$wait_s" ]; do
  for b in fa2 fa3; do tail -n 1 "$root/$b/progress.log" 2>/dev/null; done
  sleep 30
done
echo "== status after $(( $(date +%s) - t0 )) s of waiting"
rc=0
for b in fa2 fa3; do
  echo "-- $b: $(cat "$root/$b/status" 2>/dev/null || echo 'still building')"
  tail -n 4 "$root/$b/progress.log" 2>/dev/null
  if grep -q '^failed' "$root/$b/status" 2>/dev/null; then
    echo "-- $b build.log errors:"; grep -E -m 30 "error|Error" "$root/$b/build.log"; rc=3
  fi
  [ -f "$root/$b/status" ] || rc=3
done
. "$root/scripts/seed/lib.sh"
for b in fa2 fa3; do
  if [ ! -f "$root/$b/status" ] && [ "${SEED_PARTIAL:-1}" = 1 ] && [ "$skip" -eq 0 ]; then
    src=$(dirname "$(ls -d "$root/$b"/flash_attn-*/setup.py "$root/$b"/flash-attention/hopper/setup.py 2>/dev/null | head -1)")
    [ -d "$src/build" ] && seed_pack_objects "$b" "$root/$b" "$src" \
      && echo "-- $b unfinished: packed its $(tar -tJf "$root/$b/$b.objs.tar.xz" | grep -c '\.o$') objects for resuming"
  fi
done
mapfile -t parts < <(ls "$root"/fa2/parts/* "$root"/fa3/parts/* "$root"/fa2/objparts/* "$root"/fa3/objparts/* 2>/dev/null | sort)
n=0
for p in "${parts[@]:$skip:8}"; do cp "$p" "$OUT/"; n=$((n + 1)); done
left=$(( ${#parts[@]} - skip - n ))
echo "== copied $n part(s) to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
for p in "${parts[@]}"; do echo "   $(basename "$p") $(stat -c %s "$p") bytes $(sha256sum "$p" | cut -c1-16)"; done
if [ "$left" -gt 0 ]; then echo "== $left part(s) left: run lease1_collect.sh 0 $(( skip + n ))"; [ "$rc" -eq 0 ] && rc=2; fi
exit "$rc"
