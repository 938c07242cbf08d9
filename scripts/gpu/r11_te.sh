#!/usr/bin/env bash
# Call 8 of the sixth-session lease: the last Transformer Engine piece, then scripts/te/build.sh
# detached (TE_JOBS=8; the queue's Gated DeltaNet choices share the cores: GPU-bound timings
# compared within one run). Progress in ~/seed/te/progress.log, result in ~/seed/te/status.
#   run(command="bash scripts/gpu/r11_te.sh", carry=[".carry/te/te_8"], timeout_s=90)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/te_stash ~/seed/te && cp .carry/te/te_8/* ~/te_stash/
rm -rf ~/te_build && mkdir -p ~/te_build && cp -r scripts/te scripts/seed ~/te_build/
TE_JOBS=${TE_JOBS:-8} setsid nohup bash ~/te_build/te/build.sh ~/te_stash ~/te_site ~/seed/te > ~/seed/te/build.out 2>&1 < /dev/null &
sleep 5
ls ~/te_stash | wc -l; tail -3 ~/seed/te/progress.log; tail -4 ~/r7/queue.log
