#!/usr/bin/env bash
# Calls 3-7: stash Transformer Engine piece N (scripts/te/README.md) and show the queue's progress.
#   run(command="bash scripts/gpu/r7_stash.sh N", carry=[".carry/te/te_N"], timeout_s=90)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/te_stash && cp .carry/te/te_"${1:?piece}"/* ~/te_stash/ && ls ~/te_stash | tr '\n' ' '; echo
tail -4 ~/r7/queue.log 2>/dev/null
