"""Which of the worker's eager optimizations pay, one at a time, on one model per run.

    python -m bench.ablation --models bk-sdm-small,ssd-1b      # GPU, real architectures
    python -m bench.ablation --tiny --steps 2                  # CPU smoke run

Each variant gets a freshly built pipeline (random weights, real architecture) and is timed
with the worker's progress hook attached; all variants of a model run in one process, so the
ratios to plain diffusers are side by side.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.seed_table import free, log, requests_for, timed_ms, worker_progress
from tests.support.architectures import SIZES, build_random_pipeline
from worker.generate import generate
from worker.optimize import SpeedOptions, optimize

VARIANTS = {
    "plain": SpeedOptions.plain(),
    "fp16_vae": SpeedOptions(channels_last=False, fuse_qkv=False, fp16_vae=True),
    "fuse_qkv": SpeedOptions(channels_last=False, fuse_qkv=True),
    "channels_last": SpeedOptions(channels_last=True, fuse_qkv=False),
    "all_eager": SpeedOptions(channels_last=True, fuse_qkv=True, fp16_vae=True),
    "all_but_channels_last": SpeedOptions(channels_last=False, fuse_qkv=True, fp16_vae=True),
}


def time_variant(key: str, options: SpeedOptions, job, args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype) -> float:
    pipe = optimize(build_random_pipeline(key, device, dtype, tiny=args.tiny), options)
    progress = worker_progress()
    try:
        return timed_ms(lambda: generate(pipe, job, progress.on_step), device, args.runs)
    finally:
        progress.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bk-sdm-small,ssd-1b")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                    "steps": args.steps, "ms": {}}
    for key in args.models.split(","):
        job = requests_for(key, 64 if args.tiny else SIZES[key], args.steps, 1)[0]
        report["ms"][key] = {}
        for name, options in VARIANTS.items():
            report["ms"][key][name] = time_variant(key, options, job, args, device, dtype)
            free(device)  # the variant's pipeline is gone with its frame
            log(f"{key} {name}: {report['ms'][key][name]:.1f} ms")
    print(f"{'model':<13}" + "".join(f"{name:>23}" for name in VARIANTS))
    for key, times in report["ms"].items():
        print(f"{key:<13}" + "".join(f"{ms:>12.1f} ms {times['plain'] / ms:>5.2f}×" for ms in times.values()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return report


if __name__ == "__main__":
    main()
