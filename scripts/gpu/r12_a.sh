#!/usr/bin/env bash
# Second H200 lease of 2026-12-04 (sixth session), call 1 of a chain issued back to back: stash
# flash-attn-4's wheels (.carry/fa4_0: scripts/fa4/carry.sh's part one less its cu13 archive
# piece, which travels alone in call 2 now that the working tree is 24 MiB) and the Transformer
# Engine extension built on the first lease (.carry/te_built), install fla-core, copy the
# repository to ~/olmo and start scripts/gpu/r12_queue.sh detached (results in ~/r7).
#   run(command="bash scripts/gpu/r12_a.sh", carry=[".carry/wheels", ".carry/fa4_0", ".carry/te_built"], timeout_s=120)
# Then: call 2 `mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/` (carry .carry/fa4_1);
# call 3 `bash .carry/fa4_2/fa4_install.sh ~/fa4_stash ~/fa4_site` (carry .carry/fa4_2);
# r7_stash.sh 1..7; r12_te.sh (piece 8: unpack the prebuilt extension); r7_poll.sh until done.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash ~/te_stash && cp .carry/fa4_0/* ~/fa4_stash/ && cp .carry/te_built/* ~/te_stash/
fla_site
rm -rf ~/olmo ~/r7 && mkdir -p ~/olmo ~/r7
tar --exclude=./.carry -cf - . | tar -xf - -C ~/olmo
QUEUE_SECONDS=${QUEUE_SECONDS:-720} setsid nohup bash ~/olmo/scripts/gpu/r12_queue.sh > ~/r7/queue.out 2>&1 < /dev/null &
sleep 3
cat ~/r7/queue.log ~/r7/queue.out 2>/dev/null | tail -5
