#!/usr/bin/env bash
# One device call (one GPU): the GPU tests of the torch backend, modules and Gated DeltaNet, then
# the torch-backend and GDN benchmarks. Everything lands in $OUT (at most 8 files come back).
# Usage on the device, from the repo root:  bash scripts/gpu/call_torch.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .carry/wheels/fla_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla .carry/wheels/fla_core-*.whl
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/env.txt"
step() {  # step SECONDS LOGNAME CMD...
  local t=$1 log=$2; shift 2
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$log" 2>&1; local rc=$?
  echo "== $log rc=$rc $((SECONDS - t0))s"; tail -n 25 "$OUT/$log"
}
step 230 gpu_tests.log python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 --junitxml="$OUT/gpu_tests.xml" \
  tests/ops tests/backends/test_torch_backend.py tests/test_kv_cache.py tests/test_attention_gpu.py tests/recurrent
step 170 torch_bench.log python3 benchmarks/torch_backend_bench.py --out "$OUT/torch_backend.json"
PYTHONPATH=/tmp/fla step 170 gdn_bench.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn.json"
