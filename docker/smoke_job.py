"""One job through the queue for the image smoke test (docker/smoke.sh, and its no-Docker
counterpart tests/test_image_smoke.py): enqueue a tiny-model job the way the front ends do,
wait until a worker has run it, print what it took. Settings from the environment
(IMAGINE_REDIS_URL, IMAGINE_REDIS_PASSWORD, IMAGINE_MODELS, …).

    python docker/smoke_job.py [--model tiny] [--timeout 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from rq.job import Job  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from core.jobs import JobRequest  # noqa: E402
from core.queue import JobQueue, connect  # noqa: E402
from settings.config import load_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    settings = load_settings()
    redis = connect(settings)
    job_id = f"smoke-{int(time.time() * 1000)}"
    started = time.monotonic()
    JobQueue(redis, settings).submit(JobRequest(job_id=job_id, model=args.model, prompt="smoke test", steps=2,
                                                guidance=7.5, seed=1, size=args.size, store_images=True))
    while time.monotonic() - started < args.timeout:
        status = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status()
        if status == "finished":
            result = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).return_value()
            images = [redis.get(key) for key in result.get("image_keys", []) if key]
            ok = bool(images) and all(image and image.startswith(b"\x89PNG") for image in images)
            print(f"smoke job {job_id}: {getattr(status, 'value', status)}, {len(images)} PNG(s), "
                  f"{time.monotonic() - started:.1f} s")
            return 0 if ok else 1
        if status in ("failed", "canceled", "stopped"):
            print(f"smoke job {job_id}: {status}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"smoke job {job_id}: not done after {args.timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
