#!/usr/bin/env bash
# Smoke test of the built worker image, without a GPU (`make smoke-image`; CI with Docker):
#   1. build docker/Dockerfile.worker;
#   2. start Redis (with a password, as compose does) and the worker container (init, the tiny
#      random-weight model written onto a model volume, IMAGINE_COMPILE=default on the CPU: the
#      image's C compiler builds inductor's code; compile caches on the volume);
#   3. wait until the worker's /healthz answers 200 (models loaded and compiled, heartbeat fresh);
#   4. run one job through the queue (docker/smoke_job.py) and check its PNG;
#   5. docker stop the worker: it must exit 0 (SIGTERM handled) — and print the wall time.
# tests/test_image_smoke.py runs steps 2-5 without Docker, with the same command and settings.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
IMAGE=${IMAGE:-imagine-worker:smoke}
REDIS_IMAGE=$(sed -n 's/^ *image: \(redis:.*\)$/\1/p' docker/compose.yaml | head -1)
RUN=imagine-smoke-$$
PASSWORD=smoke-$$

cleanup() {
    docker rm -f "$RUN-worker" "$RUN-redis" >/dev/null 2>&1 || true
    docker network rm "$RUN" >/dev/null 2>&1 || true
    docker volume rm "$RUN-models" >/dev/null 2>&1 || true
}
trap cleanup EXIT

docker build -f docker/Dockerfile.worker -t "$IMAGE" .
docker network create "$RUN" >/dev/null
docker volume create "$RUN-models" >/dev/null
docker run -d --name "$RUN-redis" --network "$RUN" "$REDIS_IMAGE" \
    redis-server --requirepass "$PASSWORD" --maxmemory 256mb --maxmemory-policy noeviction >/dev/null
docker run --rm -v "$RUN-models:/models" "$IMAGE" python -m worker.tiny /models/tiny-sd

TINY='{"tiny": {"source": "/models/tiny-sd", "pipeline": "StableDiffusionPipeline", "native_size": 64, "default_steps": 2, "variant": null, "fast": null}}'
ENV=(-e "IMAGINE_REDIS_URL=redis://$RUN-redis:6379/0" -e "IMAGINE_REDIS_PASSWORD=$PASSWORD"
     -e "IMAGINE_MODELS=$TINY" -e 'IMAGINE_WORKER_MODELS=["tiny"]' -e IMAGINE_DEFAULT_MODEL=tiny
     -e IMAGINE_MIN_SIZE=64 -e IMAGINE_DEVICE=cpu -e IMAGINE_COMPILE=default
     -e 'IMAGINE_COMPILE_BATCH_SIZES=[1]' -e IMAGINE_MAX_BATCH_IMAGES=1 -e IMAGINE_MAX_COUNT=1
     -e IMAGINE_SAFETY_SOURCE=/models/tiny-sd -e IMAGINE_SAFETY_THRESHOLD=1.0 -e HF_HUB_OFFLINE=1)
docker run -d --init --name "$RUN-worker" --network "$RUN" -v "$RUN-models:/models" "${ENV[@]}" "$IMAGE" >/dev/null

deadline=$(( $(date +%s) + ${SMOKE_TIMEOUT_S:-900} ))
until docker exec "$RUN-worker" python -m core.probe 9102 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$RUN-worker")" != true ] || [ "$(date +%s)" -gt "$deadline" ]; then
        docker logs --tail 50 "$RUN-worker"; echo "smoke: the worker never became healthy" >&2; exit 1
    fi
    sleep 2
done
echo "smoke: /healthz 200 after $(( $(date +%s) - started )) s"
docker exec "${ENV[@]}" "$RUN-worker" python docker/smoke_job.py --timeout 300
docker exec "$RUN-worker" sh -c 'ls /compile-cache/inductor /compile-cache/artifacts-torch-*.bin >/dev/null' || { echo "smoke: no compile cache in /compile-cache" >&2; exit 1; }
docker stop -t 30 "$RUN-worker" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$RUN-worker")
[ "$code" = 0 ] || { docker logs --tail 50 "$RUN-worker"; echo "smoke: worker exited $code on docker stop" >&2; exit 1; }
echo "smoke: passed in $(( $(date +%s) - started )) s (build included)"
