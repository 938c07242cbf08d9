#!/usr/bin/env bash
# Call 8 of the fourth-session lease (2026-12-03): the last Transformer Engine piece plus the
# extension built on the lease before (.carry/te_built: te.tar.xz.part00, 1.25 MB), so
# scripts/te/build.sh only joins, checks and unpacks (no build).
#   run(command="bash scripts/gpu/r9_te.sh", carry=[".carry/te/te_6", ".carry/te_built"], timeout_s=120)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/te_stash ~/seed/te && cp .carry/te/te_6/* .carry/te_built/* ~/te_stash/
t0=$SECONDS
bash scripts/te/build.sh ~/te_stash ~/te_site ~/seed/te > ~/seed/te/build.out 2>&1
echo "te install: $((SECONDS - t0)) s, status: $(cat ~/seed/te/status)"
tail -3 ~/seed/te/build.out; tail -4 ~/r7/queue.log
