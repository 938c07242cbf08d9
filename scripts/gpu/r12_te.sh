#!/usr/bin/env bash
# The last Transformer Engine piece of the second 2026-12-04 lease; scripts/te/build.sh finds the
# prebuilt extension in the stash and only joins, checks and unpacks (14 s on 2026-12-03).
#   run(command="bash scripts/gpu/r12_te.sh", carry=[".carry/te/te_8"], timeout_s=120)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/te_stash ~/seed/te && cp .carry/te/te_8/* ~/te_stash/
t0=$SECONDS
bash scripts/te/build.sh ~/te_stash ~/te_site ~/seed/te > ~/seed/te/build.out 2>&1
echo "te install: $((SECONDS - t0)) s, status: $(cat ~/seed/te/status)"
tail -2 ~/seed/te/build.out; tail -4 ~/r7/queue.log
