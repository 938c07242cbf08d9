#!/bin/bash
# GPU machine, first command of lease 1: start the flash_2 and flash_3 builds detached and return.
#
#   run(command="bash scripts/seed/lease1_start.sh", carry=[".carry/seed"], timeout_s=120)
#
# Copies the build scripts and the carried sources to SEED_ROOT (default ~/seed, outside the
# repository: the next call's working tree replaces the repository copy), starts
# scripts/flash2/build.sh and scripts/flash3/build.sh with setsid (they outlive this call, not the
# machine), prints the machine's state and returns. The machine is given back ~30 s after a call
# goes idle: keep issuing calls (other GPU work, then scripts/seed/lease1_collect.sh) back to back.
# Resuming on a later machine (a build that did not finish: lease1_collect.sh brought back its
# objects as fa2/fa3.objs.tar.xz.partNN): SEED_BUILDS="fa3" SEED_OBJS=".carry/seedw ~/seed_stash"
# bash scripts/seed/lease1_start.sh starts only that build, from the restored objects.
# Cores: FA2_JOBS (4) + FA3_JOBS (8) nvcc jobs (one core each: one arch) of 16, ~4 left for GPU work.
set -uo pipefail
root=${SEED_ROOT:-$HOME/seed}
carry=${SEED_CARRY:-.carry/seed}
mkdir -p "$root/scripts"
cp -r scripts/seed scripts/flash2 scripts/flash3 "$root/scripts/"
cp "$carry"/flash_attn-2.8.3.post2.tar.gz "$carry"/fa3_src.tar.xz "$root/"
export FA2_JOBS=${FA2_JOBS:-4} FA3_JOBS=${FA3_JOBS:-8}
builds=${SEED_BUILDS:-fa2 fa3}
objs=()
if [ -n "${SEED_OBJS:-}" ]; then  # copied out of the repository copy, which the next call replaces
  mkdir -p "$root/objs"
  for d in $SEED_OBJS; do cp "$d"/*.objs.tar.xz.part* "$root/objs/" 2>/dev/null; done
  objs=("$root/objs")
fi
case " $builds " in *" fa2 "*)
  setsid nohup bash "$root/scripts/flash2/build.sh" "$root/flash_attn-2.8.3.post2.tar.gz" "$root/fa2" "${objs[@]}" \
    > "$root/fa2.out" 2>&1 < /dev/null &
esac
case " $builds " in *" fa3 "*)
  setsid nohup bash "$root/scripts/flash3/build.sh" "$root/fa3_src.tar.xz" "$root/fa3" "${objs[@]}" \
    > "$root/fa3.out" 2>&1 < /dev/null &
esac
sleep 5
echo "$(date -u +%FT%TZ) started: $builds (FA2_JOBS=$FA2_JOBS, FA3_JOBS=$FA3_JOBS) under $root${objs:+, objects from ${objs[*]}}"
nvcc --version | tail -2
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
nproc; free -g | head -2
tail -n 3 "$root"/fa2/progress.log "$root"/fa3/progress.log 2>/dev/null
