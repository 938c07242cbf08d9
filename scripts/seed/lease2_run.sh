#!/bin/bash
# GPU machine, lease 2, after lease2_install.sh: the GPU conformance tier for the seed backends that
# import here, beside torch and flash_4, then the backend benchmark (adapter and raw library call).
#
#   bash scripts/seed/lease2_run.sh [CONF_S] [BENCH_S]
#     CONF_S   conformance time budget in seconds (default 200; cases not started by then are
#              reported as skipped, never as passed)
#     BENCH_S  wall limit of the benchmark in seconds (default 150)
#   environment: SEED_ENV (default ~/fa4_site/seed_env.sh, sourced when present; ~/te_site/te_env.sh
#                too), SEED_SHARDS (parallel conformance processes on the one GPU, default 4),
#                SEED_BACKENDS (default: every one of flash_2 flash_3 te flash_4 that is available, + torch),
#                SEED_SEQ_LENS (benchmark T, default 8192,32768), SEED_K (conformance -k filter, default "not gdn")
#
# $OUT gets (7 files): conformance.json / .md (the merged gpu-tier report), conformance.log,
# backends.json / .md (benchmark), bench.log, preference.json (the committed file with this
# architecture's entry rewritten from the measurement). Prints a short table last.
set -uo pipefail
conf_s=${1:-200}
bench_s=${2:-150}
out=${OUT:-/tmp/seed_out}
mkdir -p "$out"
for f in "${SEED_ENV:-$HOME/fa4_site/seed_env.sh}" "$HOME/te_site/te_env.sh"; do
  # shellcheck disable=SC1090
  [ -f "$f" ] && source "$f"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
avail=$(python3 - 2>&1 <<'PY'
import torch
from olmo_attn.backends import capabilities as caps
if not torch.cuda.is_available():
    raise SystemExit("# no CUDA device here")
names = [n for n in ("flash_2", "flash_3", "te", "flash_4") if caps.unavailable_reason(n, "cuda") is None]
for n in ("flash_2", "flash_3", "te", "flash_4"):
    r = caps.unavailable_reason(n, "cuda")
    print(f"# {n}: {'available' if r is None else r}", flush=True)
print(" ".join(["torch", *names]))
PY
)
echo "$avail" | grep '^#'
backends=${SEED_BACKENDS:-$(echo "$avail" | grep -v '^#' | tail -1)}
backends=${backends:-torch}
echo "== $(date -u +%T) conformance --tier gpu --backends $backends (budget ${conf_s} s, ${SEED_SHARDS:-4} shards)"
conf_dir="$HOME/seed/conf"
rm -rf "$conf_dir"
t0=$(date +%s)
# the attention rows only (-k 'not gdn': the torch row of the Gated DeltaNet family is another issue's)
# shellcheck disable=SC2086
OUT="$conf_dir" PARALLEL_SKIP="host multigpu" CHUNK_PREFIX=seed- \
  bash conformance/gpu_run.sh parallel "${SEED_SHARDS:-4}" --backends $backends -k "${SEED_K:-not gdn}" \
  --time-budget "$conf_s" > "$out/conformance.log" 2>&1
rc=$?
for f in "$conf_dir"/chunks/*.log; do tail -n 1 "$f"; done >> "$out/conformance.log" 2>/dev/null
echo "conformance: $(( $(date +%s) - t0 )) s, exit $rc" | tee -a "$out/conformance.log"
merged=$(ls "$conf_dir"/*.json 2>/dev/null | head -1)
if [ -n "$merged" ]; then
  cp "$merged" "$out/conformance.json"
  cp "${merged%.json}.md" "$out/conformance.md" 2>/dev/null
fi
tail -n 5 "$out/conformance.log"
echo "== $(date -u +%T) backend_bench (limit ${bench_s} s)"
cp olmo_attn/backends/preference.json "$out/preference.json"
t0=$(date +%s)
timeout "$bench_s" python3 benchmarks/backend_bench.py --backends "$(echo "$backends" | tr ' ' ',')" \
  --seq-lens "${SEED_SEQ_LENS:-8192,32768}" --iters 20 --warmup 3 --out "$out/backends.json" \
  --markdown "$out/backends.md" --write-preference "$out/preference.json" > "$out/bench.log" 2>&1
rc=$?
echo "bench: $(( $(date +%s) - t0 )) s, exit $rc" | tee -a "$out/bench.log"
echo "== summary"
python3 - "$out/conformance.json" <<'PY'
import json, sys, collections
try:
    rep = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no conformance report: {e}")
    sys.exit(0)
cases = rep.get("cases") or rep.get("results") or []
count = collections.Counter()
for c in cases:
    count[(c.get("backend"), c.get("status") or c.get("outcome"))] += 1
print("| backend | " + " | ".join(sorted({s for _, s in count})) + " |")
for b in sorted({b for b, _ in count}):
    print(f"| {b} | " + " | ".join(str(count[(b, s)]) for s in sorted({s for _, s in count})) + " |")
fails = [c for c in cases if (c.get("status") or c.get("outcome")) in ("failed", "fail", "error")]
for c in fails[:25]:
    print("FAIL", c.get("id"), str(c.get("message") or c.get("error") or "")[:200])
PY
[ -f "$out/backends.md" ] && cat "$out/backends.md" || tail -n 20 "$out/bench.log"
