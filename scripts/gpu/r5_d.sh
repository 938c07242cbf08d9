#!/usr/bin/env bash
# H200, 2026-12-03, one short call on a fresh machine: benchmarks/compile_bench.py after the
# Dynamo 2.11 fix (compiled vs eager, graphs, top kernels for every module and case).
#   run(command="bash scripts/gpu/r5_d.sh", timeout_s=240)
# (Not run: no machine was lent again in that session.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TAIL=40 step 200 compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
