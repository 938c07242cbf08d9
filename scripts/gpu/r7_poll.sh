#!/usr/bin/env bash
# Later calls: wait up to SECONDS (default 540) or until the queue is done, then bring ~/r7 back
# (logs, JSON, Markdown, JUnit; TE's progress log) as $OUT/r7.tar.xz.
#   run(command="bash scripts/gpu/r7_poll.sh 540", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
wait_s=${1:-540}
t0=$SECONDS
while [ $((SECONDS - t0)) -lt "$wait_s" ] && [ ! -f ~/r7/done ]; do sleep 5; done
cp ~/seed/te/progress.log ~/r7/te_progress.log 2>/dev/null
cp ~/seed/te/status ~/r7/te_status 2>/dev/null
[ -f ~/seed/te/build.log ] && tail -200 ~/seed/te/build.log > ~/r7/te_build_tail.log
tar -C ~ -cf - r7 | xz -T8 -6 > "$OUT/r7.tar.xz"
ls -la "$OUT"; cat ~/r7/queue.log; tail -3 ~/seed/te/progress.log 2>/dev/null
