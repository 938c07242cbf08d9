#!/usr/bin/env bash
# Call 2, right after r7_a.sh: install flash-attn-4 (stash + carried part two) and fla-core, copy the
# repository to ~/olmo (later calls re-sync the working tree; the queue must not see that) and start
# scripts/gpu/$QUEUE (default r7_queue.sh) detached. QUEUE_SECONDS: the queue's whole budget.
#   run(command="bash scripts/gpu/r7_b.sh", carry=[".carry/fa4_2", ".carry/wheels"], timeout_s=120)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
bash .carry/fa4_2/fa4_install.sh ~/fa4_stash ~/fa4_site > ~/fa4_install.log 2>&1 || tail -5 ~/fa4_install.log
fla_site
rm -rf ~/olmo && mkdir -p ~/olmo ~/r7
tar --exclude=./.carry -cf - . | tar -xf - -C ~/olmo
echo "install + copy: $((SECONDS - t0)) s"
QUEUE_SECONDS=${QUEUE_SECONDS:-1380} SKIP_COMPILE=${SKIP_COMPILE:-} setsid nohup bash ~/olmo/scripts/gpu/${QUEUE:-r7_queue.sh} > ~/r7/queue.out 2>&1 < /dev/null &
sleep 5
cat ~/r7/queue.log ~/r7/queue.out 2>/dev/null | tail -5
