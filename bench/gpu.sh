#!/usr/bin/env bash
# The GPU benchmark in one go (docs/benchmarks.md): the seed table for the four models on
# Imagine's eager worker path, then the 512² models with CUDA graphs (torch.compile
# "reduce-overhead"), each against plain diffusers in the same process. JSON and logs land in
# $OUT_DIR (default out/). Stages can be named: bench/gpu.sh eager compiled-bk compiled-sd
# (eager-xl: only the two 1024² models; compiled-xl: them with CUDA graphs, not in the default
# run: compiling at 1024² takes minutes per shape).
# Extra seed_table flags go in $BENCH_ARGS (e.g. "--tiny --steps 2" for a CPU smoke run).
set -u
out=${OUT_DIR:-out}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

stage() {  # name, then seed_table arguments
  local name=$1; shift
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "$py" -m bench.seed_table "$@" ${BENCH_ARGS:-} --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
}

for one in ${*:-eager compiled-bk compiled-sd}; do
  case $one in
    eager) stage eager --runs 2 ;;
    eager-xl) stage eager-xl --models ssd-1b,sdxl-base --runs 2 ;;
    compiled-bk) stage compiled-bk --models bk-sdm-small --batch 16 --compile reduce-overhead --runs 2 ;;
    compiled-sd) stage compiled-sd --models sd-v1-4 --batch 8 --compile reduce-overhead --runs 2 ;;
    compiled-xl) stage compiled-xl --models ssd-1b,sdxl-base --batch 4 --compile reduce-overhead --runs 2 ;;
    *) echo "unknown stage: $one (eager, eager-xl, compiled-bk, compiled-sd, compiled-xl)" >&2; exit 2 ;;
  esac
done
