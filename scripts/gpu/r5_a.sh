#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second machine), call 1 of 2: stash what call 2 cannot carry beside
# flash-attn-4 part one (64 MiB a call): flash-attn-4 part two and the flash_2 / flash_3 subset
# wheels built in the first lease (scripts/gpu/r4_a.sh).
#   run(command="bash scripts/gpu/r5_a.sh", carry=[".carry/fa4_2", ".carry/fa2w", ".carry/fa3w", ".carry/wheels"], timeout_s=120)
# (Not run: no machine was lent again in that session.)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/fa4_p2 ~/seedw && cp -r .carry/fa4_2/* ~/fa4_p2/ && cp .carry/fa2w/* .carry/fa3w/* ~/seedw/
mkdir -p /tmp/fla && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla .carry/wheels/fla_core-*.whl
ls -la ~/seedw ~/fa4_p2
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
