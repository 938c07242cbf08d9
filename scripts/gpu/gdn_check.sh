#!/usr/bin/env bash
# Gated DeltaNet, one H200, <= 4 minutes: our Triton kernels' correctness (small shapes against the
# float64 token-by-token twin, benchmark-sized shapes against our float64 PyTorch kernel; fwd + every
# gradient; chunk 64; bf16/fp16/fp32; NaN isolation), speed at the benchmark shape (fwd, fwd+bwd,
# first-call compile time, peak memory) next to fla's forward and cuDNN causal attention, the
# per-kernel stage times and a launch-settings sweep. JSON under $OUT; short tables printed last.
# fla-core comes from the carried wheel (scripts/gpu/lib.sh fla_site) or /tmp/site; skipped if absent.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
fla_site
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
# 1. correctness + headline speed + stages (the part that matters most), bounded on its own
TAIL=60 step 120 gdn_a.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn_a.json" --budget 105 \
  --sections triton_correctness triton_speed triton_stages --shapes bench
# 2. the other shapes (T=32k, packed documents, FlashQLA's 16/32 heads)
TAIL=30 step 60 gdn_b.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn_b.json" --budget 50 --iters 10 \
  --sections triton_speed --shapes T32k docs FlashQLA
# 3. launch-settings sweep with whatever time is left
TAIL=40 step 55 gdn_c.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn_c.json" --budget 45 --sections triton_tune
echo "== tables"
for f in gdn_a gdn_b gdn_c; do sed -n '/== Gated DeltaNet: our Triton kernels ==/,$p' "$OUT/$f.log" | head -60; done
