#!/usr/bin/env bash
# One H200 lease, first call (<= 9.5 min): the flash_3 subset build (scripts/flash3/build.sh) detached
# on cores 0-12; meanwhile, on cores 13-15 (so the build's load does not inflate launch overhead), the
# Gated DeltaNet measurements: speed at every benchmark shape + per-kernel stages + whole layer
# (benchmarks/gdn_bench.py) and a profiler table (scripts/gpu/gdn_profile.py). Then waits for the
# FA3 wheel, returns its parts (for later leases) and installs it into ~/fa3_site.
#   run(command="bash scripts/gpu/lease_fa3_gdn.sh", carry=[".carry/seed", ".carry/wheels"], timeout_s=590)
# Next call: SEED_ENV=~/fa3_site/seed_env.sh SEED_BACKENDS="torch flash_3" SEED_K=flash_3 \
#            bash scripts/seed/lease2_run.sh 240 150
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t_start=$SECONDS
SEED_BUILDS=fa3 FA3_JOBS=14 taskset -c 0-12 bash scripts/seed/lease1_start.sh > "$OUT/fa3_start.log" 2>&1
tail -n 6 "$OUT/fa3_start.log"
fla_site
export CUDA_DEVICE_MAX_CONNECTIONS=8
TAIL=40 step 250 gdn_speed.log taskset -c 13-15 python3 benchmarks/gdn_bench.py --out "$OUT/gdn_speed.json" \
  --budget 230 --iters 20 --sections triton_speed triton_stages layer
TAIL=60 step 90 gdn_profile.log taskset -c 13-15 python3 scripts/gpu/gdn_profile.py --json "$OUT/gdn_profile.json"
# the wheel: wait for the build (whatever is left of ~9 minutes)
while [ ! -f ~/seed/fa3/status ] && [ $((SECONDS - t_start)) -lt 540 ]; do sleep 5; done
tail -n 4 ~/seed/fa3/progress.log
cat ~/seed/fa3/status 2>/dev/null || echo "fa3 build still running after $((SECONDS - t_start)) s"
if grep -q '^ok' ~/seed/fa3/status 2>/dev/null; then
  cp ~/seed/fa3/parts/* "$OUT/"
  bash scripts/seed/lease2_install.sh ~/fa3_site ~/seed/fa3/parts
fi
cp ~/seed/fa3/progress.log "$OUT/fa3_progress.log" 2>/dev/null
echo "call: $((SECONDS - t_start)) s"
