#!/usr/bin/env bash
# Call 8: the last Transformer Engine piece; scripts/te/build.sh detached (TE_JOBS=8: the queue's
# conformance run shares the 16 cores). Progress in ~/seed/te/progress.log, result ~/seed/te/status.
#   run(command="bash scripts/gpu/r7_te.sh", carry=[".carry/te/te_6"], timeout_s=90)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/te_stash ~/seed/te && cp .carry/te/te_6/* ~/te_stash/
rm -rf ~/te_build && mkdir -p ~/te_build && cp -r scripts/te scripts/seed ~/te_build/
TE_JOBS=${TE_JOBS:-8} setsid nohup bash ~/te_build/te/build.sh ~/te_stash ~/te_site ~/seed/te > ~/seed/te/build.out 2>&1 < /dev/null &
sleep 10
tail -3 ~/seed/te/progress.log; tail -4 ~/r7/queue.log
