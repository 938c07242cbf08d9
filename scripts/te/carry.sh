#!/bin/bash
# On a connected machine, from the repo root: Transformer Engine 2.20.2 for the lent GPU machine
# (CUDA 13, torch 2.11, Python 3.12, no network), split into carry folders that fit one device call
# beside the working tree (64 MiB per call in all: pieces of 62 MiB less the tracked tree's size).
#
#   bash scripts/te/carry.sh [OUT]          (OUT default .carry/te; git-ignored)
#
# Measured on the CPU machine (2026-12-02): the core wheel transformer-engine-cu13 2.20.2 is
# 276.5 MB, of which libtransformer_engine.so is 343 MB unpacked; its kernels are already
# compressed, so re-packing does not help (unzip + tar | xz -6: 265 MB). It therefore travels as
# the wheel itself, cut into pieces: OUT/te_1 .. OUT/te_N, one device call each (the working tree
# travels with every call). The last folder also holds the
# transformer-engine-torch sdist (0.5 MB; pip reads its metadata only with a CUDA torch, hence
# the stand-in below) and the pure-Python / small dependencies the device's image lacks:
# pydantic (+ pydantic-core, annotated-types, typing-inspection), importlib-metadata,
# nvdlfw-inspect, nvidia-cudnn-frontend 1.32.0 (the C++ headers the extension build needs), einops
# (imported by transformer_engine.pytorch.attention), and the transformer-engine 2.20.2 meta wheel
# (empty, but TE's import checks that its metadata is there, with the core's version).
# Then see scripts/te/README.md.
set -euo pipefail
out=${1:-.carry/te}
py=${PYTHON:-.venv/bin/python}
tree_mib=$(( ($(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1) >> 20) + 1 ))
piece=${TE_PIECE_MIB:-$(( 62 - tree_mib ))}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
dl() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$1" "$2"; }
rm -rf "$out"
mkdir -p "$out/small"
dl "$tmp" transformer-engine-cu13==2.20.2
# the sdist: its setup.py parses torch.version.cuda, which is None for a CPU torch
mkdir -p "$tmp/stub"
printf 'import torch.version\nif torch.version.cuda is None:\n    torch.version.cuda = "13.0"\n' > "$tmp/stub/sitecustomize.py"
PYTHONPATH="$tmp/stub" "$py" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
  -d "$out/small" transformer-engine-torch==2.20.2
for p in pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata==10.2.0 \
         nvdlfw-inspect==0.2.2 nvidia-cudnn-frontend==1.32.0 einops==0.8.2 transformer-engine==2.20.2; do
  dl "$out/small" "$p"
done
core_pin=$(unzip -p "$out"/small/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
dl "$out/small" "pydantic-core==$core_pin"
echo "downloads: $(( $(date +%s) - t0 )) s"
wheel=$(ls "$tmp"/transformer_engine_cu13-*.whl)
(cd "$tmp" && sha256sum "$(basename "$wheel")") > "$out/small/core.sha256"
split -b "${piece}M" -d -a 1 "$wheel" "$tmp/core.part"
i=1
for p in "$tmp"/core.part*; do
  mkdir -p "$out/te_$i"
  mv "$p" "$out/te_$i/"
  i=$((i + 1))
done
last=$((i - 1))
small_mib=$(du -sm "$out/small" | cut -f1)
last_mib=$(du -sm "$out/te_$last" | cut -f1)
if [ $(( small_mib + last_mib )) -le "$piece" ]; then dest="$out/te_$last"; else dest="$out/te_$i"; fi
mkdir -p "$dest"
mv "$out"/small/* "$dest/"
rmdir "$out/small"
du -sh "$out"/te_*
echo "carry folders: $(ls -d "$out"/te_* | wc -l) of <= $piece MiB (tree $tree_mib MiB); total $(( $(date +%s) - t0 )) s"
