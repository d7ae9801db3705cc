"""Fast vs standard per image, for each seed model's configuration (catalog steps, scheduler,
guidance), on the tiny pipelines (CPU) — or the real architectures with random weights on a GPU.

    python -m bench.fast_mode                 # tiny pipelines, CPU: the table in docs/benchmarks.md
    python -m bench.fast_mode --real --device cuda

On the tiny pipelines the numbers say what steps × (1 or 2 UNet passes) cost relative to each
other, not what a GPU does with a real UNet. Fast mode's adapter is the tiny random LoRA (the
real ones load from the hub on GPU hosts; a peft LoRA adds a little work per adapted layer).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from core.jobs import JobRequest
from settings.catalog import build_catalog
from tests.support.architectures import build_random_pipeline
from worker.generate import generate
from worker.pipelines import load_fast_adapter
from worker.tiny import write_tiny_lora


def per_image_ms(pipe, request: JobRequest, fast, runs: int) -> float:
    generate(pipe, request, fast=fast)  # warm up
    started = time.perf_counter()
    for _ in range(runs):
        generate(pipe, request, fast=fast)
    return (time.perf_counter() - started) * 1000 / runs / request.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="real architectures (random weights), not tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    catalog = build_catalog()
    print("| model | standard (steps, scheduler, guidance) | ms/image | fast (steps, scheduler, guidance, adapter) | ms/image | speed-up |")
    print("|---|---|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for key, entry in catalog.items():
            pipe = build_random_pipeline(key, device, dtype, tiny=not args.real)  # the model's own scheduler
            fast = entry.fast
            if fast.adapter:  # a random LoRA of the right shapes stands in for the published one
                local = entry.model_copy(update={"fast": fast.model_copy(update={
                    "adapter": str(write_tiny_lora(Path(scratch, key), pipe, rank=4 if not args.real else 64))})})
                load_fast_adapter(pipe, local)
                fast = local.fast
            size = entry.native_size if args.real else 64
            standard = JobRequest(job_id="b", model=key, prompt="a lighthouse at dusk", steps=entry.default_steps,
                                  guidance=entry.default_guidance, seed=1, size=size)
            guidance = entry.default_guidance if fast.guidance is None else fast.guidance
            quick = standard.model_copy(update={"quality": "fast", "steps": fast.steps, "guidance": guidance})
            std_ms = per_image_ms(pipe, standard, None, args.runs)
            fast_ms = per_image_ms(pipe, quick, fast, args.runs)
            std_sched = type(pipe.scheduler).__name__
            adapter = "LCM-LoRA" if fast.adapter else "none"
            print(f"| {key} | {standard.steps}, {std_sched}, {standard.guidance:g} | {std_ms:.0f} | "
                  f"{fast.steps}, {fast.scheduler}, {guidance:g}, {adapter} | {fast_ms:.0f} | {std_ms / fast_ms:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
