#!/bin/bash
# On the GPU machine: install Transformer Engine 2.20.2 from carried pieces and build its PyTorch
# extension against the machine's torch.
#
#   bash scripts/te/build.sh STASH SITE [WORK]
#     STASH  folder holding every carried piece (core.partN, the sdist, the small wheels, core.sha256):
#            each call i copies .carry/te/te_i/* there (scripts/te/README.md); with the pieces of
#            an earlier build (te.tar.xz.partNN) there too, those are unpacked and nothing is built
#     SITE   scratch site folder (e.g. ~/te_site); WORK default ~/seed/te
#   environment: TE_JOBS (default 12)
#
# Joins and checks the core wheel, unzips it and the small wheels into SITE, builds
# transformer-engine-torch (a C++ extension, 33 sources; NVTE_CUDA_ARCHS=90) with SITE on
# PYTHONPATH (it needs the core's headers and cudnn-frontend's), unzips the result into SITE, packs
# it as WORK/parts/te.tar.xz.partNN (to bring back and reuse), prints the export line and writes it
# to SITE/te_env.sh. Progress: WORK/progress.log; output: WORK/build.log; result: WORK/status.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../seed/lib.sh"
stash=${1:?usage: build.sh STASH SITE [WORK]}
site=${2:?usage: build.sh STASH SITE [WORK]}
work=${3:-$HOME/seed/te}
mkdir -p "$site" "$work"
t0=$(date +%s)
wheel_name=$(awk '{print $2}' "$stash/core.sha256")
cat "$stash"/core.part* > "$work/$wheel_name"
(cd "$work" && sha256sum -c "$stash/core.sha256") || { echo "failed sha256 0" > "$work/status"; exit 1; }
python3 -m zipfile -e "$work/$wheel_name" "$site"
rm -f "$work/$wheel_name"
for w in "$stash"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
echo "$(seed_now) te core + small wheels into $site: $(( $(date +%s) - t0 )) s" >> "$work/progress.log"
# A wheel built on an earlier machine (the te.tar.xz.partNN pieces packed below, carried back into
# STASH): unpack it instead of building, when it was built against this torch.
if ls "$stash"/te.tar.xz.part* > /dev/null 2>&1; then
  cat "$stash"/te.tar.xz.part* | tar -xJf - -C "$site" || { echo "failed unpack $(( $(date +%s) - t0 ))" > "$work/status"; exit 1; }
  line="export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
  echo "$line" > "$site/te_env.sh"
  eval "$line"
  python3 -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__file__)" >&2 \
    || { echo "failed import-prebuilt $(( $(date +%s) - t0 ))" > "$work/status"; exit 1; }
  echo "ok prebuilt $(( $(date +%s) - t0 ))" > "$work/status"
  echo "$(seed_now) te: prebuilt extension unpacked, import ok, $(( $(date +%s) - t0 )) s" >> "$work/progress.log"
  echo "$line"
  exit 0
fi
rm -rf "$work/src"
mkdir -p "$work/src"
tar -xzf "$stash"/transformer_engine_torch-*.tar.gz -C "$work/src"
src=$(ls -d "$work"/src/transformer_engine_torch-*/ | head -1)
total=$(find "$src/csrc" -name '*.cpp' | wc -l)
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" NVTE_CUDA_ARCHS=90 MAX_JOBS=${TE_JOBS:-12} \
  NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch NVTE_WITH_NCCL_EP=0
# The sources include cudnn.h and nccl.h, which a CUDA toolkit need not hold and which torch's CUDA
# wheels do (nvidia/*/include): every such folder goes on gcc's CPATH, after the toolkit's -I.
wheel_inc=$(python3 - <<'PY'
import os
import nvidia  # namespace package of torch's CUDA wheels

dirs = []
for root in nvidia.__path__:
    for d, sub, _ in os.walk(root):
        if os.path.basename(d) == "include":
            dirs.append(d)
            sub[:] = []
print(":".join(dirs))
PY
)
export CPATH="$wheel_inc${CPATH:+:$CPATH}"
echo "$(seed_now) te CPATH: $CPATH" >> "$work/progress.log"
seed_build te "$work" "$src" "$total" python3 setup.py bdist_wheel || exit 1
python3 -m zipfile -e "$(ls "$src"/dist/*.whl | head -1)" "$site"
line="export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
echo "$line" > "$site/te_env.sh"
eval "$line"
python3 -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__file__)" >&2 \
  || echo "import transformer_engine.pytorch FAILED" >&2
echo "$(seed_now) te done in $(( $(date +%s) - t0 )) s" >> "$work/progress.log"
echo "$line"
