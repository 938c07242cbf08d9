#!/bin/bash
# On a connected machine (the CPU machine), from the repo root: everything the first GPU lease needs
# to build flash_2 and flash_3 offline, in ONE git-ignored folder (default .carry/seed, ~10 MB).
#
#   bash scripts/seed/prepare.sh FA_GIT [CUTLASS_GIT] [OUT]
#     FA_GIT       git directory of github.com/Dao-AILab/flash-attention (FA3's hopper/ sources)
#     CUTLASS_GIT  git directory of github.com/NVIDIA/cutlass (the commit FA3 pins); optional
#     OUT          default .carry/seed
#
# Writes OUT/flash_attn-2.8.3.post2.tar.gz (the flash-attn 2 sdist; pip needs torch installed to
# read its metadata, hence the project's virtual environment) and OUT/fa3_src.tar.xz, then checks the
# source subsets on this machine (scripts/flash2/subset.py --dry-run, scripts/flash3/dry_run.py).
set -euo pipefail
fa_git=${1:?usage: prepare.sh FA_GIT [CUTLASS_GIT] [OUT]}
cutlass_git=${2:-}
out=${3:-.carry/seed}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
t0=$(date +%s)
if [ ! -f "$out/flash_attn-2.8.3.post2.tar.gz" ]; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$py" -m pip download -q --no-deps --no-build-isolation \
    --no-binary=:all: flash-attn==2.8.3.post2 -d "$out"
fi
echo "flash-attn sdist: $(( $(date +%s) - t0 )) s"
FA2_SDIST="$out/flash_attn-2.8.3.post2.tar.gz" bash scripts/flash3/carry.sh "$fa_git" "$out/fa3_src.tar.xz" $cutlass_git
echo "fa3 sources: $(( $(date +%s) - t0 )) s"
# check both subsets here (no CUDA needed)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$out/flash_attn-2.8.3.post2.tar.gz" -C "$tmp"
"$py" scripts/flash2/subset.py --src "$tmp"/flash_attn-2.8.3.post2 --hdims "${FA2_HDIMS:-64,128,256}" --dry-run | head -1
tar -xJf "$out/fa3_src.tar.xz" -C "$tmp"
(
  for h in 64 96 128 192 256; do
    case " ${FA3_HDIMS:-64 128 256} " in *" $h "*) ;; *) export "FLASH_ATTENTION_DISABLE_HDIM$h=TRUE" ;; esac
  done
  export FLASH_ATTENTION_DISABLE_FP8=TRUE FLASH_ATTENTION_DISABLE_PAGEDKV=TRUE FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE \
    FLASH_ATTENTION_DISABLE_PACKGQA=TRUE FLASH_ATTENTION_DISABLE_CLUSTER=TRUE FLASH_ATTENTION_DISABLE_HDIMDIFF64=TRUE \
    FLASH_ATTENTION_DISABLE_HDIMDIFF192=TRUE FLASH_ATTENTION_DISABLE_SM80=TRUE FLASH_ATTENTION_DISABLE_SPLIT=TRUE
  "$py" scripts/flash3/dry_run.py "$tmp/flash-attention/hopper" | tail -1
)
du -sh "$out"
