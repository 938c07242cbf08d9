#!/bin/bash
# GPU machine, lease 2 (or any later fresh machine): install the flash_2 / flash_3 wheels built in lease 1.
#
#   bash scripts/seed/lease2_install.sh SITE DIR [DIR...]
#     SITE  the site folder to extract into; use flash-attn-4's (~/fa4_site, scripts/fa4/README.md)
#           when both are wanted: flash-attn 2's `flash_attn/` package and flash-attn-4's
#           `flash_attn/cute/` must share one folder (a regular package hides a namespace part
#           of the same name that sits in another folder of PYTHONPATH)
#     DIR   folders holding the parts returned by lease1_collect.sh (fa2.tar.xz.partNN,
#           fa3.tar.xz.partNN): a carried git-ignored folder, and ~/seed_stash where parts were
#           stashed by an earlier call (lease2_stash.sh) when they did not fit one call's 64 MiB
#
# Joins each wheel's parts in name order, extracts them into SITE, checks the imports, prints the
# `export PYTHONPATH=...` line (eval it) and writes it to SITE/seed_env.sh for later calls.
set -uo pipefail
site=${1:?usage: lease2_install.sh SITE DIR [DIR...]}
shift
mkdir -p "$site"
for b in fa2 fa3; do
  mapfile -t parts < <(for d in "$@"; do ls "$d"/$b.tar.xz.part* 2>/dev/null; done | awk -F/ '{print $NF"\t"$0}' | sort -u -k1,1 | cut -f2)
  if [ "${#parts[@]}" -eq 0 ]; then echo "$b: no parts in $*" >&2; continue; fi
  t0=$(date +%s)
  keep=()
  # flash-attn 2.8.3's wheel ships an old flash_attn/cute/ of its own: never over flash-attn-4's
  # (extracted over it, flash-attn-4 failed to import: "cutlass.cute.core has no attribute ThrMma")
  [ "$b" = fa2 ] && [ -d "$site/flash_attn/cute" ] && keep=(--exclude=flash_attn/cute)
  if cat "${parts[@]}" | tar -xJf - -C "$site" "${keep[@]}"; then
    echo "$b: extracted ${#parts[@]} part(s) into $site in $(( $(date +%s) - t0 )) s" >&2
  else
    echo "$b: extraction FAILED (missing or corrupt part?): ${parts[*]}" >&2
  fi
done
line="export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$site/nvidia_cutlass_dsl/dsl_packages" ] && line="export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
echo "$line" > "$site/seed_env.sh"
eval "$line"
python3 - >&2 <<'PY'
import importlib
for mod in ("flash_attn_2_cuda", "flash_attn.flash_attn_interface", "flash_attn_interface", "flash_attn.cute"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod}: ok ({getattr(m, '__file__', '')})")
    except Exception as e:  # report, do not stop: each backend is judged by its own run
        print(f"import {mod}: {type(e).__name__}: {e}")
PY
echo "$line"
