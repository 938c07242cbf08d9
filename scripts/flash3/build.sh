#!/bin/bash
# On the GPU machine: build FlashAttention-3 (flash-attention's hopper/, module flash_attn_interface)
# for sm_90a with the subset of kernels our conformance matrix covers.
#
#   bash scripts/flash3/build.sh SRC_TAR WORK [OBJDIR...]
#     SRC_TAR  fa3_src.tar.xz (scripts/flash3/carry.sh: hopper/ + README.md + csrc/cutlass/include)
#     WORK     scratch folder outside the repository (emptied first), e.g. ~/seed/fa3
#     OBJDIR   folders with fa3.objs.tar.xz.partNN (objects of an unfinished earlier build; see
#              scripts/flash2/build.sh)
#   environment: FA3_HDIMS (default "64 128 256"), FA3_JOBS (parallel nvcc jobs, default 8),
#                FA3_SPLIT=1 to keep the split-KV kernels (faster decoding, 7 more objects)
#
# Built: head dims 64 / 128 / 256 (hdim_v = hdim), bf16 and fp16, forward and backward, causal and
# sliding-window (local) masks, varlen (documents), KV-cache append (flash_attn_with_kvcache with
# k/v and cache_leftpad). Left out (FLASH_ATTENTION_DISABLE_*): FP8, paged KV, softcap, split-KV,
# PackGQA (an optimisation; GQA itself works without it), thread-block clusters, head dims 96 / 192,
# the hdim_v != hdim kernels, the sm_80 kernels. A head dim that rounds to a dropped one runs on the
# next kept size (FA3 rounds up to a compiled one); FP8 / paged / softcap calls raise.
# Output as in scripts/flash2/build.sh: WORK/progress.log, build.log, status, parts/fa3.tar.xz.partNN.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../seed/lib.sh"
tarball=${1:?usage: build.sh SRC_TAR WORK [OBJDIR...]}
work=${2:?usage: build.sh SRC_TAR WORK [OBJDIR...]}
shift 2
hdims=${FA3_HDIMS:-64 128 256}
jobs=${FA3_JOBS:-8}
rm -rf "$work"
mkdir -p "$work"
tar -xJf "$tarball" -C "$work" || { echo "failed untar 0" > "$work/status"; exit 1; }
src="$work/flash-attention/hopper"
# setup.py runs `git submodule update` unconditionally (a crash where git is missing); CUTLASS is
# already in the archive
python3 - "$src/setup.py" <<'PY' || { echo "failed patch 0" > "$work/status"; exit 1; }
import sys
p = sys.argv[1]
s = open(p).read()
call = 'subprocess.run(["git", "submodule", "update", "--init", "../csrc/cutlass"])'
if call in s:
    s = s.replace(call, "pass  # olmo-attn: CUTLASS is carried in csrc/cutlass")
    open(p, "w").write(s)
PY
touch -d 2000-01-01T00:00:00Z "$src/setup.py"
seed_restore_objects fa3 "$src" "$@" >> "$work/progress.log"
n=0
for h in 64 96 128 192 256; do
  case " $hdims " in
    *" $h "*) n=$((n + 1)) ;;
    *) export "FLASH_ATTENTION_DISABLE_HDIM$h=TRUE" ;;
  esac
done
export FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_DISABLE_FP8=TRUE FLASH_ATTENTION_DISABLE_PAGEDKV=TRUE \
  FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE FLASH_ATTENTION_DISABLE_PACKGQA=TRUE FLASH_ATTENTION_DISABLE_CLUSTER=TRUE \
  FLASH_ATTENTION_DISABLE_HDIMDIFF64=TRUE FLASH_ATTENTION_DISABLE_HDIMDIFF192=TRUE FLASH_ATTENTION_DISABLE_SM80=TRUE \
  MAX_JOBS=$jobs NVCC_THREADS=2
# objects: forward n x {bf16, fp16} (x2 with split), backward n x {bf16, fp16}, flash_api, prepare_scheduler
if [ "${FA3_SPLIT:-0}" = 1 ]; then
  total=$(( n * 2 * 2 + n * 2 + 3 ))  # + flash_fwd_combine.cu
else
  export FLASH_ATTENTION_DISABLE_SPLIT=TRUE
  total=$(( n * 2 + n * 2 + 2 ))
fi
env | grep -E "^FLASH_ATTENTION_DISABLE" | sort >> "$work/progress.log"
seed_build fa3 "$work" "$src" "$total" python3 setup.py bdist_wheel
