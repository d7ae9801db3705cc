"""The seed article's latency table on any machine: the four models side by side, plain
diffusers against Imagine's worker path, measured in one run.

    python -m bench.seed_table                    # GPU, real architectures, random weights
    python -m bench.seed_table --compile max-autotune
    python -m bench.seed_table --tiny --steps 2   # CPU smoke run on tiny configs (CI)

Per model: single-image latency (plain ``pipe(prompt, negative_prompt)`` vs Imagine's optimized
pipeline), images/s at a queue depth of 16 (plain: one call per job; Imagine: batched), peak GPU
memory, and the pixel difference between the two paths on the same seed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import diffusers
import numpy as np
import torch
import transformers

from core.jobs import JobRequest
from settings.config import Settings
from tests.support.architectures import SIZES, UNETS, build_random_pipeline
from worker.generate import generate, generate_batch
from worker.optimize import SpeedOptions, optimize
from worker.progress import ProgressReporter

PROMPT = "an orange cat staring off with pretty eyes, striking image, 8K, desktop background"
NEGATIVE = "ugly, poorly rendered face, low resolution, poorly drawn feet, blurry, watermark"
SEED_ARTICLE_MS = {"sdxl-base": 82212.8, "ssd-1b": 59382.0, "sd-v1-4": 15356.6, "bk-sdm-small": 10027.1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def worker_progress() -> ProgressReporter:
    """The worker's step hook with the default edit interval; the Discord edit itself is left out."""
    return ProgressReporter(send=lambda step, total, png: None,
                            interval_s=Settings.model_fields["progress_interval_s"].default)


def requests_for(key: str, size: int, steps: int, depth: int) -> list[JobRequest]:
    return [JobRequest(job_id=f"b{i}", model=key, prompt=f"{PROMPT} #{i}", negative_prompt=NEGATIVE,
                       steps=steps, guidance=7.5, seed=i, size=size) for i in range(depth)]


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Peak signal-to-noise ratio in dB; None when the images are identical (infinite)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * np.log10(255**2 / mse), 1)


def bench_model(key: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    log(f"{key}: building")
    pipe = build_random_pipeline(key, device, dtype, tiny=args.tiny)
    size = 64 if args.tiny else SIZES[key]
    jobs = requests_for(key, size, args.steps, args.depth)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def plain_one() -> None:  # the seed article's way
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, height=size, width=size)

    row: dict = {"model": key, "size": size, "steps": args.steps,
                 "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)}
    log(f"{key}: plain diffusers")
    row["plain_ms"] = timed_ms(plain_one, device, args.runs)
    started = time.perf_counter()
    for job in jobs:
        generate(pipe, job)
    row["plain_img_per_s"] = len(jobs) / (time.perf_counter() - started)
    reference = np.asarray(generate(pipe, jobs[0]).images[0])

    log(f"{key}: Imagine's worker path, warm-up (compile={args.compile})")
    progress = worker_progress()  # the worker always passes its progress hook
    started = time.perf_counter()
    optimize(pipe, SpeedOptions(channels_last=True, fuse_qkv=True, compile=args.compile, fp16_vae=True))
    for count in sorted({1, args.batch}):  # compile (if any) happens here, as at worker start
        generate_batch(pipe, jobs[:count], progress.on_step)
    row["warmup_s"] = time.perf_counter() - started
    log(f"{key}: Imagine's worker path, timed")
    row["imagine_ms"] = timed_ms(lambda: generate(pipe, jobs[0], progress.on_step), device, args.runs)
    sync(device)
    started = time.perf_counter()
    for i in range(0, len(jobs), args.batch):
        generate_batch(pipe, jobs[i:i + args.batch], progress.on_step)
    sync(device)
    row["imagine_img_per_s"] = len(jobs) / (time.perf_counter() - started)
    progress.close()
    optimized = np.asarray(generate(pipe, jobs[0]).images[0])
    row["max_pixel_diff"] = int(np.abs(reference.astype(int) - optimized.astype(int)).max())
    row["psnr_db"] = psnr(reference, optimized)
    row["speedup_1img"] = row["plain_ms"] / row["imagine_ms"]
    row["speedup_depth"] = row["imagine_img_per_s"] / row["plain_img_per_s"]
    row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def free(device: torch.device) -> None:
    """After a model's pipeline went out of scope: give its memory back before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(rows: list[dict], depth: int) -> None:
    head = (f"{'model':<13}{'seed ms':>9}{'plain ms':>10}{'imagine ms':>11}{'×':>6}"
            f"{f'plain img/s@{depth}':>17}{f'imagine img/s@{depth}':>19}{'×':>6}{'peak GiB':>9}"
            f"{'maxΔpx':>7}{'PSNR':>7}")
    print(head)
    for r in rows:
        peak = "-" if r["peak_mem_GiB"] is None else f"{r['peak_mem_GiB']:.1f}"
        print(f"{r['model']:<13}{SEED_ARTICLE_MS[r['model']]:>9.0f}{r['plain_ms']:>10.1f}{r['imagine_ms']:>11.1f}"
              f"{r['speedup_1img']:>6.2f}{r['plain_img_per_s']:>17.2f}{r['imagine_img_per_s']:>19.2f}"
              f"{r['speedup_depth']:>6.2f}{peak:>9}{r['max_pixel_diff']:>7}{r['psnr_db'] or '∞':>7}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(UNETS), help="comma-separated catalog keys")
    parser.add_argument("--tiny", action="store_true", help="tiny test configs (CPU/CI)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16, help="queued jobs for the throughput figure")
    parser.add_argument("--batch", type=int, default=8, help="Imagine's max images per pipeline call")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {dtype}, {args.steps} steps, CFG 7.5, "
          f"{'tiny configs' if args.tiny else 'real architectures, random weights'}, compile={args.compile}")
    report = {"device": name, "torch": torch.__version__, "compile": args.compile, "batch": args.batch,
              "steps": args.steps, "rows": []}
    for key in args.models.split(","):
        report["rows"].append(bench_model(key, args, device, dtype))
        free(device)
        if args.json:  # after each model, so a run cut short keeps what it measured
            with open(args.json, "w") as out:
                json.dump(report, out, indent=1)
    print_table(report["rows"], args.depth)
    print(json.dumps(report))
    return report["rows"]


if __name__ == "__main__":
    main()
