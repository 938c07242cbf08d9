#!/usr/bin/env bash
# H200 lease of 2026-12-03 (third session), call 1 of a chain issued back to back (the machine goes
# back ~30 s after a call goes idle): stash flash-attn-4 part one outside the repository.
#   run(command="bash scripts/gpu/r7_a.sh", carry=[".carry/fa4_1"], timeout_s=120)
# Then r7_b.sh (install, start the queue), r7_stash.sh 1..5 (Transformer Engine pieces),
# r7_te.sh (last piece, detached build), r7_poll.sh until the queue is done.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.used --format=csv,noheader
python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__)"
python3 -c "import einops, wheel, packaging; print('einops', einops.__version__, 'wheel', wheel.__version__)" 2>&1 | tail -1
python3 -c "import torch.utils.cpp_extension as c; print('ninja', c.is_ninja_available())"; which nvcc g++ | tr "\n" " "; echo
nproc; free -g | awk '/Mem:/{print $2 " GiB"}'; df -h ~ | tail -1
