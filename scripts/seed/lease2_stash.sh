#!/bin/bash
# GPU machine: copy carried wheel parts to a stash outside the repository, for a later call on the
# same warm machine (one call carries at most 64 MiB; the machine goes back ~30 s after a call).
#   bash scripts/seed/lease2_stash.sh DIR [STASH]     (STASH default ~/seed_stash)
set -euo pipefail
src=${1:?usage: lease2_stash.sh DIR [STASH]}
stash=${2:-$HOME/seed_stash}
mkdir -p "$stash"
cp "$src"/*.part* "$stash"/
ls -la "$stash"
