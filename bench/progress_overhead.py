"""What live progress costs generation: the same tiny-pipeline jobs run side by side with
no progress, with the background ProgressReporter (the worker's way), and with a naive
synchronous edit inside the denoising loop — each edit simulated as a Discord PATCH of
``--edit-ms`` latency, throttled to one per ``--interval`` seconds.

    python -m bench.progress_overhead [--runs 9] [--steps 30] [--size 128] [--edit-ms 150] [--preview]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from core.jobs import JobRequest
from settings.catalog import ModelEntry
from worker.generate import generate
from worker.pipelines import load_pipeline
from worker.progress import ProgressReporter, latent_preview
from worker.tiny import write_tiny_pipeline


def timed(pipe, request, on_step=None, after=None) -> float:
    started = time.perf_counter()
    generate(pipe, request, on_step=on_step)
    if after:
        after()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--edit-ms", type=float, default=150.0)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--preview", action="store_true", help="also project a latent preview per edit")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a busy host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = write_tiny_pipeline(Path(tempfile.mkdtemp(prefix="imagine-bench-")) / "tiny")
    pipe = load_pipeline(ModelEntry(key="tiny", source=str(folder), pipeline="StableDiffusionPipeline"),
                         torch.device("cpu"), torch.float32)
    request = JobRequest(job_id="bench", model="tiny", prompt="an orange cat", steps=args.steps,
                         guidance=7.5, seed=0, size=args.size)
    edits = {"reporter": 0, "inline": 0}

    def fake_edit(kind: str) -> None:
        edits[kind] += 1
        time.sleep(args.edit_ms / 1000)  # the PATCH round trip

    def with_reporter() -> float:
        reporter = ProgressReporter(lambda step, total, png: fake_edit("reporter"), args.interval,
                                    preview=(lambda l: latent_preview(l, xl=False)) if args.preview else None)
        return timed(pipe, request, reporter.on_step, reporter.close)

    def inline() -> float:
        last = [float("-inf")]

        def on_step(step, total, latents):
            if time.monotonic() - last[0] >= args.interval:
                if args.preview:
                    latent_preview(latents, xl=False)
                fake_edit("inline")
                last[0] = time.monotonic()
        return timed(pipe, request, on_step)

    generate(pipe, request)  # warm up
    results: dict[str, list[float]] = {"none": [], "reporter": [], "inline": []}
    for _ in range(args.runs):  # interleaved, so drift hits all three alike
        results["none"].append(timed(pipe, request))
        results["reporter"].append(with_reporter())
        results["inline"].append(inline())
    base = statistics.median(results["none"])
    print(f"{args.runs} runs × {args.steps} steps, {args.size}px tiny SD on CPU; simulated edit "
          f"{args.edit_ms:.0f} ms, interval {args.interval} s, preview {'on' if args.preview else 'off'}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<9} median {median:8.1f} ms  min {min(values):8.1f} ms  ratio to none {median / base:5.2f}  "
              f"edits/run {edits.get(name, 0) / args.runs:4.1f}")


if __name__ == "__main__":
    main()
