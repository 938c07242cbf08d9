#!/usr/bin/env bash
# The conformance run on a lent GPU machine, in chunks that each fit one device call, then merged.
#
#   conformance/gpu_run.sh run NAME [olmo-attn conformance options...]   one chunk -> $DEST/chunks/NAME.json
#   conformance/gpu_run.sh merge                                         chunks -> $DEST/<gpu>-<date>.{json,md,xml}
#   conformance/gpu_run.sh all [options...]                              --tier all in one go, then the reports
#   conformance/gpu_run.sh parallel N [options...]                       --tier all side by side, then merged:
#       the gpu tier as N shards spread round-robin over the visible GPUs (CUDA_VISIBLE_DEVICES), the
#       host tiers (config, cpu, multiproc) and, with 2+ GPUs, the multigpu tier beside them.
#       Env: PARALLEL_SKIP ("host", "multigpu"), GPU_ARGS / HOST_ARGS / MULTIGPU_ARGS (extra options of
#       one part), CHUNK_PREFIX (chunk names; `merge` reads chunks in name order, a later result wins)
#
# DEST is $OUT when set (the device tool's output folder), else conformance/reports. Suggested chunks:
#   run host      --tier config,cpu
#   run gpu-torch --tier gpu --backends torch fla
#   run gpu-flash --tier gpu --backends flash_2 flash_3 flash_4 te
#   run cp-cpu    --tier multiproc
#   run cp-gpu    --tier multigpu            (2+ GPUs: run it on an nvidia-h100-x2 machine)
# Each chunk's JSON is complete on its own; `merge` refuses chunks from different GPUs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SELF="$PWD/conformance/gpu_run.sh"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEST=${OUT:-conformance/reports}
mkdir -p "$DEST/chunks"
gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' | tr ' /' '__')
stem="$DEST/${gpu}-$(date -u +%F)"
cmd=${1:-all}
shift || true
case "$cmd" in
  run)
    name=${1:?usage: gpu_run.sh run NAME [options]}
    shift
    start=$(date +%s)
    set +e
    "$PY" -m conformance --no-progress --json "$DEST/chunks/$name.json" "$@" 2>&1 | tee "$DEST/chunks/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "chunk $name: exit code $rc, $(( $(date +%s) - start )) s" | tee -a "$DEST/chunks/$name.log"
    exit "$rc"
    ;;
  merge)
    "$PY" -m olmo_attn.cli conformance --merge "$DEST"/chunks/*.json \
      --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
    ;;
  parallel)
    n=${1:?usage: gpu_run.sh parallel N [options]}
    shift
    ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    if [ "$ngpu" -lt 1 ]; then
      echo "gpu_run.sh parallel needs a CUDA GPU" >&2
      exit 2
    fi
    skip=" ${PARALLEL_SKIP:-} "  # e.g. "host multigpu"
    procs=$(( n + 2 ))
    # side-by-side processes share the cores: bound each one's BLAS/OpenMP threads and Inductor workers
    # (unbounded, N processes x all-core thread pools made CPU cases 100x slower on a 32-core host)
    per=$(( $(nproc) / procs > 1 ? $(nproc) / procs : 1 ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$per}
    pre=${CHUNK_PREFIX:-}
    pids=()
    for i in $(seq 1 "$n"); do
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$(( (i - 1) % ngpu )) "$SELF" run "${pre}gpu-$i-of-$n" --tier gpu --shard "$i/$n" "$@" ${GPU_ARGS:-} >/dev/null 2>&1 &
      pids+=($!)
    done
    if [[ "$skip" != *" host "* ]]; then
      # shellcheck disable=SC2086
      "$SELF" run "${pre}host" --tier config,cpu,multiproc "$@" ${HOST_ARGS:-} >/dev/null 2>&1 &
      pids+=($!)
    fi
    if [ "$ngpu" -ge 2 ] && [[ "$skip" != *" multigpu "* ]]; then
      # shellcheck disable=SC2086
      "$SELF" run "${pre}multigpu" --tier multigpu "$@" ${MULTIGPU_ARGS:-} >/dev/null 2>&1 &
      pids+=($!)
    fi
    for p in "${pids[@]}"; do wait "$p" || true; done
    tail -q -n 1 "$DEST"/chunks/"$pre"*.log
    "$SELF" merge
    ;;
  all)
    "$PY" -m conformance --no-progress --tier all --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml" "$@"
    ;;
  *)
    echo "usage: gpu_run.sh run NAME [options] | merge | all [options] | parallel N [options]" >&2
    exit 2
    ;;
esac
