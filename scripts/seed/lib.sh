#!/bin/bash
# Helpers shared by the detached extension builds (scripts/flash2/build.sh, scripts/flash3/build.sh,
# scripts/te/build.sh) on the GPU machine. Source it; bash only.

seed_now() { date -u +%FT%TZ; }

# seed_build NAME WORK SRC TOTAL CMD...
#   Runs CMD in SRC (its output in WORK/build.log) and, while it runs, appends one line every
#   10 s to WORK/progress.log: time, objects compiled so far (*.o under SRC/build) / TOTAL,
#   seconds since the start, memory in use, load. When CMD ends it writes WORK/status
#   ("ok WHEEL SECONDS" or "failed RC SECONDS") and, on success, packs the wheel from
#   SRC/dist/ (unzipped, re-packed as tar.xz: what gets extracted into a site folder) into
#   WORK/parts/NAME.tar.xz.partNN pieces of 15 MiB (one device call returns files of <= 16 MiB).
seed_build() {
  local name=$1 work=$2 src=$3 total=$4
  shift 4
  local t0 rc n wheel
  t0=$(date +%s)
  mkdir -p "$work"
  rm -f "$work/status"
  echo "$(seed_now) $name start: $* (in $src, $total objects)" >> "$work/progress.log"
  ( cd "$src" && exec "$@" ) > "$work/build.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    n=$(find "$src/build" -name '*.o' 2>/dev/null | wc -l)
    echo "$(seed_now) $name $n/$total objects, $(( $(date +%s) - t0 )) s, mem used $(free -g | awk '/Mem:/{print $3}') GiB, load $(cut -d' ' -f1 /proc/loadavg)" >> "$work/progress.log"
    sleep 10
  done
  wait "$pid"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "failed $rc $(( $(date +%s) - t0 ))" > "$work/status"
    echo "$(seed_now) $name FAILED rc=$rc after $(( $(date +%s) - t0 )) s; last lines of build.log:" >> "$work/progress.log"
    grep -E "error|Error|FAILED" "$work/build.log" | head -20 >> "$work/progress.log"
    return "$rc"
  fi
  wheel=$(ls "$src"/dist/*.whl | head -1)
  echo "$(seed_now) $name built $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) in $(( $(date +%s) - t0 )) s; packing" >> "$work/progress.log"
  seed_pack "$name" "$wheel" "$work"
  echo "ok $(basename "$wheel") $(( $(date +%s) - t0 ))" > "$work/status"
  echo "$(seed_now) $name packed: $(ls "$work/parts" | tr '\n' ' ')" >> "$work/progress.log"
}

# seed_pack NAME WHEEL WORK: WHEEL's contents -> WORK/parts/NAME.tar.xz.partNN (15 MiB pieces)
seed_pack() {
  local name=$1 wheel=$2 work=$3
  rm -rf "$work/x" "$work/parts"
  mkdir -p "$work/x" "$work/parts"
  python3 -m zipfile -e "$wheel" "$work/x"
  tar -C "$work/x" -cf - . | xz -T8 -3 > "$work/$name.tar.xz"
  split -b 15M -d -a 2 "$work/$name.tar.xz" "$work/parts/$name.tar.xz.part"
  rm -rf "$work/x"
}

# seed_pack_objects NAME WORK SRC: the compiled-so-far objects of an unfinished build (SRC/build/temp*:
#   *.o, build.ninja, .ninja_log, .ninja_deps) -> WORK/objparts/NAME.objs.tar.xz.partNN. A later
#   machine restores them at the same absolute path (seed_restore_objects) and ninja compiles only
#   what is missing: the sources keep their archive times and the patched headers get a fixed old
#   time (build.sh), so every restored object is newer than its inputs; an object that was being
#   written when packed has no .ninja_log entry and is rebuilt.
seed_pack_objects() {
  local name=$1 work=$2 src=$3
  rm -rf "$work/objparts"
  mkdir -p "$work/objparts"
  (cd "$src" && tar -cf - build/temp* 2>/dev/null) | xz -T8 -3 > "$work/$name.objs.tar.xz"
  split -b 15M -d -a 2 "$work/$name.objs.tar.xz" "$work/objparts/$name.objs.tar.xz.part"
}

# seed_restore_objects NAME SRC DIR...: join NAME.objs.tar.xz.partNN found in DIRs and extract into SRC
seed_restore_objects() {
  local name=$1 src=$2
  shift 2
  local parts
  mapfile -t parts < <(for d in "$@"; do ls "$d/$name".objs.tar.xz.part* 2>/dev/null; done | awk -F/ '{print $NF"\t"$0}' | sort -u -k1,1 | cut -f2)
  [ "${#parts[@]}" -gt 0 ] || return 0
  cat "${parts[@]}" | tar -xJf - -C "$src" && echo "$(seed_now) $name: restored $(find "$src/build" -name '*.o' | wc -l) objects from ${#parts[@]} part(s)"
}
