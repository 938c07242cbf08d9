#!/bin/bash
# On a connected machine: pack FlashAttention-3's sources for an offline build, as one tar.xz.
#
#   bash scripts/flash3/carry.sh FA_GIT OUT_TAR [CUTLASS_GIT]
#     FA_GIT       a git directory of github.com/Dao-AILab/flash-attention (a bare clone is enough)
#     OUT_TAR      e.g. .carry/seed/fa3_src.tar.xz (git-ignored)
#     CUTLASS_GIT  a git directory of github.com/NVIDIA/cutlass holding the commit that flash-attention
#                  pins as its csrc/cutlass submodule; without it, CUTLASS comes from FA2_SDIST
#   environment: FA3_COMMIT (default below), FA2_SDIST (flash-attn 2.8.3 sdist; its csrc/cutlass)
#
# The archive holds flash-attention/{hopper/, README.md (setup.py reads it), csrc/cutlass/include/}.
# The pinned commit is the newest main of 2026-08 ("v3.0.0" in hopper/__init__.py): FA3 at
# flash-attn v2.8.3 downloads a CUDA 12.8 toolchain during the build whenever nvcc is not 12.8,
# which cannot work offline on a CUDA 13 machine; the later hopper/setup.py uses the system
# nvcc 13 (and torch >= 2.9's stable ABI, flash_api_stable.cpp).
set -euo pipefail
fa_git=${1:?usage: carry.sh FA_GIT OUT_TAR [CUTLASS_GIT]}
out=${2:?usage: carry.sh FA_GIT OUT_TAR [CUTLASS_GIT]}
cutlass_git=${3:-}
commit=${FA3_COMMIT:-0251105a2fb19d2957484b7f023cd8c115286ced}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/flash-attention"
mkdir -p "$root/csrc/cutlass"
git --git-dir="$fa_git" archive --prefix=hopper/ "$commit:hopper" | tar -xf - -C "$root"
git --git-dir="$fa_git" show "$commit:README.md" > "$root/README.md"
pin=$(git --git-dir="$fa_git" ls-tree "$commit" csrc/cutlass | awk '{print $3}')
if [ -n "$cutlass_git" ] && git --git-dir="$cutlass_git" cat-file -e "$pin^{commit}" 2>/dev/null; then
  git --git-dir="$cutlass_git" archive --prefix=include/ "$pin:include" | tar -xf - -C "$root/csrc/cutlass"
  echo "CUTLASS include/ at the pinned submodule commit $pin"
else
  sdist=${FA2_SDIST:?no CUTLASS git dir with $pin: set FA2_SDIST to the flash-attn 2.8.3 sdist}
  tar -xzf "$sdist" -C "$tmp" --wildcards '*/csrc/cutlass/include/*'
  mv "$tmp"/flash_attn-*/csrc/cutlass/include "$root/csrc/cutlass/"
  echo "CUTLASS include/ from $sdist (flash-attention pins $pin at $commit)"
fi
echo "$commit" > "$root/hopper/OLMO_ATTN_SOURCE_COMMIT"
mkdir -p "$(dirname "$out")"
tar -C "$tmp" -cf - flash-attention | xz -T2 -6 > "$out"
du -h "$out"
