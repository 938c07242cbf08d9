#!/bin/bash
# On the GPU machine: build a flash-attn 2.8.3 wheel for sm_90 with only the head dims we test.
#
#   bash scripts/flash2/build.sh SDIST WORK [OBJDIR...]
#     SDIST  flash_attn-2.8.3.post2.tar.gz (scripts/seed/prepare.sh downloads it on a connected machine)
#     WORK   scratch folder outside the repository (emptied first), e.g. ~/seed/fa2
#     OBJDIR folders with fa2.objs.tar.xz.partNN: objects of an unfinished earlier build, restored
#            first so that only the missing ones compile (scripts/seed/lib.sh, seed_pack_objects)
#   environment: FA2_HDIMS (default 64,128,256), FA2_JOBS (parallel nvcc jobs, default 4)
#
# Runs in the foreground (scripts/seed/lease1_start.sh starts it detached with setsid). Progress:
# WORK/progress.log (objects done / total every 10 s), the compiler's output: WORK/build.log,
# the result: WORK/status, the wheel in 15 MiB pieces: WORK/parts/fa2.tar.xz.partNN.
# The source is cut down by scripts/flash2/subset.py (head dims, no ALiBi / softcap / uneven K);
# dropout, sliding windows, varlen and the split-KV kernels of flash_attn_with_kvcache stay.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../seed/lib.sh"
sdist=${1:?usage: build.sh SDIST WORK [OBJDIR...]}
work=${2:?usage: build.sh SDIST WORK [OBJDIR...]}
shift 2
hdims=${FA2_HDIMS:-64,128,256}
jobs=${FA2_JOBS:-4}
rm -rf "$work"
mkdir -p "$work"
tar -xzf "$sdist" -C "$work" || { echo "failed untar 0" > "$work/status"; exit 1; }
src=$(ls -d "$work"/flash_attn-*/ | head -1)
python3 "$here/subset.py" --src "$src" --hdims "$hdims" >> "$work/progress.log" 2>&1 \
  || { echo "failed subset 0" > "$work/status"; exit 1; }
# a fixed old time for the patched files: objects restored from an earlier machine stay newer
touch -d 2000-01-01T00:00:00Z "$src/setup.py" "$src/csrc/flash_attn/src/static_switch.h"
seed_restore_objects fa2 "$src" "$@" >> "$work/progress.log"
total=$(python3 "$here/subset.py" --src "$src" --hdims "$hdims" --count)
export FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=$jobs NVCC_THREADS=2 FLASH_ATTENTION_FORCE_BUILD=TRUE
seed_build fa2 "$work" "$src" "$total" python3 setup.py bdist_wheel
