#!/usr/bin/env bash
# The GPU benchmark in one go (docs/benchmarks.md). JSON and logs land in $OUT_DIR (default
# out/); every script rewrites its JSON after each model, so a run cut short keeps its rows.
# Stages can be named: bench/gpu.sh eager compiled-bk compiled-sd
#   seed table (round one):  eager, eager-xl, compiled-bk, compiled-sd, compiled-xl
#   round two (issue 19):    speed-compiled-bk  (CUDA graphs, empty compile cache: a first start;
#                                                per image, depth 16, profile of one call)
#                            speed-restart-bk   (the same in a fresh process on the warm cache:
#                                                a restart on the same host)
#                            speed-eager        (all four models: eager, quantized, VAE vs tiny
#                                                autoencoder, fast mode)
#                            speed-compiled-xl  (the 1024² models with CUDA graphs, batches of 1 and 4)
#                            cold-start-bk      (not in round2: bench.cold_start, first start and
#                                                restart through the worker's own warm-up)
#                            step-kernels       (bench.fused_step: the scheduler step alone, diffusers'
#                                                vs fused: kernels and syncs per step; seconds)
#                            speed-quantized-bk (bk-sdm-small with CUDA graphs and its UNet quantized:
#                                                fp8 on Hopper/Ada, else int8; speed and PSNR vs plain)
#   round1 = eager compiled-bk compiled-sd;  round2 = step-kernels speed-eager speed-compiled-bk
#   speed-restart-bk speed-compiled-xl;  no stage named: round1 then round2 (make bench-gpu).
#   pending = what docs/benchmarks.md still marks "not measured", most wanted first: step-kernels
#   speed-compiled-bk speed-restart-bk speed-compiled-xl speed-quantized-bk (a session lent a GPU
#   for ~15 minutes: DEADLINE=… bench/gpu.sh pending; every batch size 1–16 warmed, as the
#   restart target counts "all shapes", where the 2026-11-30 run warmed only 1 and 16).
# $DEADLINE (seconds after this script starts) stops stages that would start after it and cuts
# the running one there, so a fixed time slot always ends with its files written.
# Extra flags for seed_table and gpu_speed go in $BENCH_ARGS (e.g. "--tiny --steps 2": a CPU
# smoke run).
set -u
out=${OUT_DIR:-out}
py=${PYTHON:-python}
cache=${COMPILE_CACHE:-$out/compile-cache}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

run() {  # name, module, then its arguments
  local name=$1 module=$2; shift 2
  local limit=()
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then echo "skipped $name: deadline" | tee -a "$out/skipped.log"; return; fi
    limit=(timeout --signal=INT "$left")
  fi
  echo "== $name"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "${limit[@]}" "$py" -m "bench.$module" "$@" ${BENCH_ARGS:-} --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
}

stage() { local name=$1; shift; run "$name" seed_table "$@"; }
bk_sizes=${BK_BATCH_SIZES:-$(seq -s, 1 16)}  # compose's bk-sdm-small worker: batches of up to 16

round1="eager compiled-bk compiled-sd"
round2="step-kernels speed-eager speed-compiled-bk speed-restart-bk speed-compiled-xl"
pending="step-kernels speed-compiled-bk speed-restart-bk speed-compiled-xl speed-quantized-bk"
# shellcheck disable=SC2086  # stage lists split on spaces
set -- $(echo "${*:-round1 round2}" | sed "s/round1/$round1/; s/round2/$round2/; s/pending/$pending/")
for one in "$@"; do
  case $one in
    eager) stage eager --runs 2 ;;
    eager-xl) stage eager-xl --models ssd-1b,sdxl-base --runs 2 ;;
    compiled-bk) stage compiled-bk --models bk-sdm-small --batch 16 --compile reduce-overhead --runs 2 ;;
    compiled-sd) stage compiled-sd --models sd-v1-4 --batch 8 --compile reduce-overhead --runs 2 ;;
    compiled-xl) stage compiled-xl --models ssd-1b,sdxl-base --batch 4 --compile reduce-overhead --runs 2 ;;
    speed-compiled-bk|speed-restart-bk)
      # A first start: the compile cache starts empty and the random weights are built, then
      # saved; the restart loads them from disk as a worker loads its model.
      [ "$one" = speed-compiled-bk ] && rm -rf "$cache" "$out/weights"
      run "$one" gpu_speed --stage compiled --models bk-sdm-small --batch-sizes "$bk_sizes" \
        --cache-dir "$cache" --weights-dir "$out/weights" --profile "$out" --trace ;;
    speed-eager) run speed-eager gpu_speed --stage eager --runs 2 ;;
    step-kernels) BENCH_ARGS='' run step-kernels fused_step --runs 5 ;;  # takes no model flags
    speed-compiled-xl)
      run speed-compiled-xl gpu_speed --stage compiled --models ssd-1b,sdxl-base --batch-sizes 1,4 \
        --depth 8 --runs 2 --cache-dir "$cache" ;;
    speed-quantized-bk)  # on the compile cache of speed-compiled-bk's shapes: only the quantized graphs compile
      run speed-quantized-bk gpu_speed --stage compiled --models bk-sdm-small --quantize auto \
        --batch-sizes "$bk_sizes" --cache-dir "$cache" ;;
    cold-start-bk)
      rm -rf "$out/cold-start-cache"
      run cold-start-bk cold_start --real --model bk-sdm-small --compile reduce-overhead \
        --batch-sizes "$bk_sizes" --cache-dir "$out/cold-start-cache" ;;
    *) echo "unknown stage: $one (see the comment at the top of bench/gpu.sh)" >&2; exit 2 ;;
  esac
done
