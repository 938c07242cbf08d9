#!/bin/bash
# Prepare flash-attn-4 (CuTe DSL) and the OLMo-core peer for the lent GPU machine, in two carry
# folders of < 64 MiB each.
#
# Usage (on the CPU machine, from the repo root):  bash scripts/fa4/carry.sh [PART1] [PART2]
#   defaults: .carry/fa4_1 and .carry/fa4_2 (git-ignored). Then see scripts/fa4/README.md:
#   device call 1 carries PART1 and stashes it; call 2 (right away) carries PART2 and runs
#   PART2/fa4_install.sh STASH SITE, which prints the `export PYTHONPATH=...` line to eval and
#   also writes it to SITE/env.sh for later calls on the same warm machine.
set -euo pipefail
a=${1:-.carry/fa4_1}; b=${2:-.carry/fa4_2}
rm -rf "$a" "$b"; mkdir -p "$a" "$b/peer"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$1" "$2"; }
# flash-attn-4 and its CuTe DSL stack (pins as verified on the lent H200)
for p in flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
         nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5; do
  dl "$a" "$p"
done
# OLMo-core 3.0.0 as a peer (module_bench); its cached_path cloud imports fail there -> scripts/peer
for p in ai2-olmo-core==3.0.0 dataclass-extensions==0.5.0 bettermap==1.3.1 dill==0.4.1 \
         importlib_resources==7.1.0 cached_path==1.8.10; do
  dl "$b/peer" "$p"
done
# the 92 MB CuTe DSL libraries: unzip, re-pack as one tar.xz (~66 MB), split across the two calls
dl "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$tmp/x" && (cd "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl . \
  && tar -cf - . | xz -T2 -6 > "$tmp/cu13.tar.xz")
split -b 38M "$tmp/cu13.tar.xz" "$tmp/cu13.part."
mv "$tmp/cu13.part.aa" "$a/"; mv "$tmp/cu13.part.ab" "$b/"
cat > "$b/fa4_install.sh" <<'INNER'
#!/bin/bash
# On the device, in call 2: $1 = where call 1 stashed part one; $2 = scratch site folder.
# Prints the export line (eval it) and writes it to $2/env.sh (source it in later calls).
set -euo pipefail
stash=${1:?stash}; site=${2:?site}; here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$site"
cat "$stash"/cu13.part.aa "$here"/cu13.part.ab | tar -xJf - -C "$site"
# `pip --target` refuses to merge the shared nvidia_cutlass_dsl folder: unzip every wheel instead
for w in "$stash"/*.whl "$here"/peer/*.whl; do python3 -m zipfile -e "$w" "$site"; done
line="export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
echo "$line" > "$site/env.sh"
echo "$line"
INNER
chmod +x "$b/fa4_install.sh"
du -sh "$a" "$b"
