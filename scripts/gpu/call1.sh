#!/usr/bin/env bash
# Device call 1 (one GPU): stash flash-attn-4 part one for call 2, then the torch/fla conformance
# chunk and the Gated DeltaNet benchmark.  carry: .carry/fa4_1 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
fla_site
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
TAIL=12 step 330 conf_torch.log python3 -m conformance --no-progress --tier gpu --backends torch fla --json "$OUT/conf_gpu_torch.json"
TAIL=45 step 230 gdn_bench.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn.json"
