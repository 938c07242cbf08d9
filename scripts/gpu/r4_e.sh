#!/usr/bin/env bash
# H200 lease of 2026-12-03, call 5, warm machine of r4_a-d. Carry: the flash-attn-4 wheel alone.
# flash-attn 2.8.3's wheel ships an old flash_attn/cute/ (FA4's forerunner) and extracting it into
# ~/fa4_site overwrote flash-attn-4's files (cutlass.cute.core has no ThrMma): unzip flash-attn-4's
# wheel again over it; then the merged gpu tier with all four backends and compile_bench.
#   run(command="bash scripts/gpu/r4_e.sh", carry=[".carry/fa4_1/flash_attn_4-4.0.0b36-py3-none-any.whl"], timeout_s=560)
# (Run once: the machine was taken back for other work before it finished; no result.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
source ~/fa3_site/seed_env.sh
source ~/fa4_site/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONFAULTHANDLER=1
fla_site
python3 -m zipfile -e .carry/fa4_1/flash_attn_4-*.whl ~/fa4_site
python3 -c "import flash_attn, flash_attn.cute; print('flash_attn', flash_attn.__version__, '+ cute ok')" 2>&1 | tail -1
stem=$OUT/NVIDIA_H200-gpu-all
TAIL=40 step ${CONF_S:-300} all.log python3 -m conformance --no-progress --tier gpu --backends torch flash_2 flash_3 flash_4 \
  --jobs auto --compile-cache ~/cc --time-budget $(( ${CONF_S:-300} - 30 )) --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
TAIL=60 step 150 compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
grep -n -m 3 -B 30 "sourceless" "$OUT/compile.log" | head -80 > "$OUT/compile_trace.log"
