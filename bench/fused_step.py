"""The scheduler step alone, plain diffusers vs the fused step (worker.fused_step), side by side
in one process: per step, the operations that touch latent-sized tensors (each one a kernel
launch on a GPU), the host time of the step, and on CUDA the device→host syncs per denoising
loop (each one makes the CPU wait for the UNet before it can queue the next step).

The "model" is a fixed elementwise function (its kernels left out of the count), so what is
measured is the step, not a UNet. Kernels and syncs need CUDA; on CPU only the host time and
the difference to diffusers' latents are measured.

    python -m bench.fused_step [--device cpu|cuda] [--batch 2] [--size 512] [--steps 25] [--runs 5] [--json f.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import diffusers
import torch

from worker import fused_step

SCHEDULERS = {  # the models' own configurations: SD 1.x, SDXL, bk-sdm-small's fast mode
    "PNDMScheduler": dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
    "EulerDiscreteScheduler": dict(steps_offset=1, timestep_spacing="leading"),
    "DPMSolverMultistepScheduler": dict(steps_offset=1),
}
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def kernels_per_step(name: str, fused: bool, latents: torch.Tensor, steps: int) -> float | None:
    """GPU kernels launched per denoising step by the step calls: the profiled loop's kernels
    less those of the same loop without its steps (the model's). None off CUDA."""
    if latents.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for skip in (False, True):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loop(name, fused, latents, steps, skip_steps=skip)
        counts.append(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
    return round((counts[0] - counts[1]) / steps, 2)


def fake_model(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * 0.7)


def loop(name: str, fused: bool, latents: torch.Tensor, steps: int,
         skip_steps: bool = False) -> tuple[float, torch.Tensor]:
    """One denoising loop as diffusers' pipelines run it; host milliseconds per step of the
    ``step`` calls alone (the model runs outside the timed part), and the final latents.
    ``skip_steps``: the model's calls only (what kernels_per_step subtracts)."""
    scheduler = getattr(diffusers, name)(**BETAS, **SCHEDULERS[name])
    scheduler.set_timesteps(steps, device=latents.device)
    if fused:
        fused_step.install(scheduler, compiled=True)
    x, step_s = latents.clone(), 0.0
    for t in scheduler.timesteps:
        eps = fake_model(scheduler.scale_model_input(x, t))
        if skip_steps:
            continue
        started = time.perf_counter()
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        step_s += time.perf_counter() - started
    if latents.device.type == "cuda":
        torch.cuda.synchronize()
    return step_s * 1000 / len(scheduler.timesteps), x


def syncs(name: str, fused: bool, latents: torch.Tensor, steps: int) -> int | None:
    """Device→host syncs in one loop (torch's sync debug mode warns on each); None off CUDA."""
    if latents.device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop(name, fused, latents, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(name: str, latents: torch.Tensor, steps: int, runs: int) -> dict:
    row: dict = {"scheduler": name}
    for variant, fused in (("plain", False), ("fused", True)):
        loop(name, fused, latents, steps)  # warm: compiles the combine, fills allocator caches
        times = [loop(name, fused, latents, steps)[0] for _ in range(runs)]
        row[f"{variant}_step_ms"] = round(statistics.median(times), 4)
        row[f"{variant}_kernels_per_step"] = kernels_per_step(name, fused, latents, steps)
        row[f"{variant}_syncs_per_loop"] = syncs(name, fused, latents, steps)
    plain, fused = loop(name, False, latents, steps)[1], loop(name, True, latents, steps)[1]
    row["max_abs_diff"] = float((plain.float() - fused.float()).abs().max())
    row["host_speedup"] = round(row["plain_step_ms"] / row["fused_step_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the step sees one latent each)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a busy host)")
    parser.add_argument("--json", type=Path, help="write the report here after every scheduler")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    latents = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "batch": args.batch,
            "size": args.size, "steps": args.steps, "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    print("| scheduler | kernels / step (plain → fused) | host ms / step (plain / fused) | syncs / loop | max abs diff |")
    print("|---|---|---|---|---|")
    for name in SCHEDULERS:
        row = measure(name, latents, args.steps, args.runs)
        rows.append(row)
        sync = "n/a (CPU)" if row["plain_syncs_per_loop"] is None else \
            f"{row['plain_syncs_per_loop']} → {row['fused_syncs_per_loop']}"
        kernels = "n/a (CPU)" if row["plain_kernels_per_step"] is None else \
            f"{row['plain_kernels_per_step']:g} → {row['fused_kernels_per_step']:g}"
        print(f"| {name} | {kernels} | "
              f"{row['plain_step_ms']:.3f} / {row['fused_step_ms']:.3f} ({row['host_speedup']:.2f}×) | {sync} | "
              f"{row['max_abs_diff']:.1e} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps({**info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
