#!/usr/bin/env bash
# The torch backend on a CUDA machine: its GPU tests, then the side-by-side benchmark.
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_torch_tests.sh
# Writes $OUT/torch_gpu_tests.xml (JUnit), $OUT/torch_backend_<gpu>-<date>.json and the test/bench logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
rc=0
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/torch_gpu_tests.xml" \
    tests/ops tests/backends/test_torch_backend.py tests/test_kv_cache.py 2>&1 | tee "$OUT/torch_gpu_tests.log" \
    || rc=1
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo gpu)
python3 benchmarks/torch_backend_bench.py --out "$OUT/torch_backend_${gpu}-$(date +%F).json" 2>&1 \
    | tee "$OUT/torch_backend_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
exit $rc
