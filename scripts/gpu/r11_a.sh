#!/usr/bin/env bash
# H200 lease of 2026-12-04 (sixth session), call 1 of a chain issued back to back (the machine goes
# back ~30 s after a call goes idle): stash Transformer Engine piece 1, install fla-core, copy the
# repository to ~/olmo and start scripts/gpu/r11_queue.sh detached (logs and results in ~/r7).
#   run(command="bash scripts/gpu/r11_a.sh", carry=[".carry/wheels", ".carry/te/te_1"], timeout_s=120)
# Then r7_stash.sh 2..7, r11_te.sh (piece 8, the TE build detached), r7_poll.sh until done.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/te_stash && cp .carry/te/te_1/* ~/te_stash/
fla_site
rm -rf ~/olmo ~/r7 && mkdir -p ~/olmo ~/r7
tar --exclude=./.carry -cf - . | tar -xf - -C ~/olmo
QUEUE_SECONDS=${QUEUE_SECONDS:-900} setsid nohup bash ~/olmo/scripts/gpu/r11_queue.sh > ~/r7/queue.out 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.used --format=csv,noheader
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)"
sleep 3
cat ~/r7/queue.log ~/r7/queue.out 2>/dev/null | tail -5
