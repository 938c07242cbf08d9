#!/usr/bin/env bash
# Device call 2 (same warm machine, right after call 1): install flash-attn-4, check the flash_4
# adapter, run its conformance chunk, and measure every backend (-> preference order).
# carry: .carry/fa4_2 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
bash .carry/fa4_2/fa4_install.sh ~/fa4_stash ~/fa4_site > "$OUT/fa4_install.log" 2>&1 || { echo "FA4 install failed"; cat "$OUT/fa4_install.log"; }
source ~/fa4_site/env.sh
fla_site
python3 -c "import flash_attn.cute as c; print('flash_attn.cute OK', getattr(c, '__version__', ''))"
TAIL=25 step 150 fa4_check.log python3 scripts/fa4/gpu_check.py --out "$OUT/fa4_gpu_check.json"
TAIL=12 step 270 conf_flash4.log python3 -m conformance --no-progress --tier gpu --backends flash_4 --json "$OUT/conf_gpu_flash4.json"
cp olmo_attn/backends/preference.json "$OUT/preference.json"
TAIL=30 step 160 backend_bench.log python3 benchmarks/backend_bench.py --out "$OUT/backends.json" --write-preference "$OUT/preference.json"
