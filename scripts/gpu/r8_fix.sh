#!/usr/bin/env bash
# Second machine, 2026-12-03: r8_queue.sh sourced ~/te_site/te_env.sh before build.sh wrote it (the
# status file comes first), so its te tier ran without TE. Stops the queue and runs the te tier and
# backend_bench again, detached.   run(command="bash scripts/gpu/r8_fix.sh", timeout_s=60)
pkill -f "r8_queue" ; pkill -f "m conformance" ; sleep 2
cd ~/olmo || exit 1
cat > ~/fix_chain.sh <<'INNER'
cd ~/olmo
export OUT=~/r7
source scripts/gpu/lib.sh
source ~/fa4_site/env.sh
source ~/te_site/te_env.sh
export PYTHONPATH="$PWD:/tmp/fla:$PYTHONPATH" PYTHONFAULTHANDLER=1
echo "$(date -u +%T) fix start" >> ~/r7/queue.log
NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 step 60 te_probe.log python3 scripts/te/probe.py
step 320 te_conf.log python3 -m conformance --no-progress --tier gpu --backends te torch flash_4 --jobs auto \
  --time-budget 290 --json ~/r7/NVIDIA_H200-te.json --markdown ~/r7/NVIDIA_H200-te.md --junit ~/r7/NVIDIA_H200-te.xml
echo "$(date -u +%T) te tier done" >> ~/r7/queue.log
TAIL=14 step 110 backends.log python3 benchmarks/backend_bench.py --backends te,torch,flash_4 \
  --masks causal,sliding_window,documents --seq-lens 8192,32768 --out ~/r7/backends.json --markdown ~/r7/backends.md
echo "$(date -u +%T) bench done" >> ~/r7/queue.log
touch ~/r7/done
INNER
rm -f ~/r7/done ~/r7/NVIDIA_H200-te.*
setsid nohup bash ~/fix_chain.sh > ~/r7/fix.out 2>&1 < /dev/null &
sleep 15
tail -4 ~/r7/te_probe.log | cut -c1-250; tail -3 ~/r7/queue.log
