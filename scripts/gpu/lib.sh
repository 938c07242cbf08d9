# Helpers for the device-call scripts: bounded steps whose logs land in $OUT.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
step() {  # step SECONDS LOGNAME CMD...  (log in $OUT/LOGNAME, its tail printed)
  local t=$1 log=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$t" "$@" > "$OUT/$log" 2>&1; local rc=$?
  echo "== $log rc=$rc $((SECONDS - t0))s"; tail -n "${TAIL:-20}" "$OUT/$log" | cut -c1-400
}
fla_site() {  # flash-linear-attention 0.6.0 from the carried wheel, once per machine
  if [ ! -d /tmp/fla/fla ] && ls .carry/wheels/fla_core-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla .carry/wheels/fla_core-*.whl
  fi
  [ -d /tmp/fla/fla ] && export PYTHONPATH=/tmp/fla${PYTHONPATH:+:$PYTHONPATH}
  return 0
}
fa4_site() {  # flash-attn-4 from the stash of an earlier call (part one) and the carried part two
  bash .carry/fa4_2/fa4_install.sh ~/fa4_stash ~/fa4_site > /tmp/fa4_install.log 2>&1 || { echo "FA4 install failed"; cat /tmp/fa4_install.log; }
  source ~/fa4_site/env.sh
}
queue_note() {  # queue_note TEXT: a timestamped line in $OUT/queue.log (the detached lease queues)
  echo "$(date -u +%T) +${SECONDS}s $*" >> "$OUT/queue.log"
}
queue_cap() {  # queue_cap SECONDS [RESERVE]: SECONDS, or what is left of $total less RESERVE if smaller
  local c=$1 l=$(( total - SECONDS - ${2:-0} )); [ "$l" -lt "$c" ] && c=$l; echo "$c"
}
queue_init() {  # queue_init DEFAULT_SECONDS: a detached lease queue's set-up (results in ~/r7 as $R and
  # $OUT, flash-attn-4's site and fla on the path, $total = $QUEUE_SECONDS or DEFAULT_SECONDS)
  R=~/r7
  mkdir -p "$R"
  export OUT=$R
  [ -f ~/fa4_site/env.sh ] && source ~/fa4_site/env.sh
  export PYTHONPATH="$PWD:/tmp/fla${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
  total=${QUEUE_SECONDS:-$1}
  queue_note start
}
