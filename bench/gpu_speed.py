"""GPU speed, round two (issue 19): per-image latency of every speed option against plain
diffusers in one process, a profile of the compiled denoising step, and the fast-mode and
fast-decode figures.

    python -m bench.gpu_speed --stage eager --models bk-sdm-small,sdxl-base --json out/eager.json
    python -m bench.gpu_speed --stage compiled --models bk-sdm-small --cache-dir out/cache \\
        --batch-sizes 1,16 --profile out/profile --json out/compiled.json
    python -m bench.gpu_speed --tiny --steps 2 --stage eager      # CPU smoke run (tests)

Stages (each writes its JSON after every model, so a run cut short keeps what it measured):

- ``eager``: plain diffusers; Imagine's eager path (fused QKV, channels-last, fp16 VAE); the
  same with the UNet quantized (fp8 where the GPU has it, else int8); the full VAE decode
  against the tiny autoencoder's (TAESD architecture); fast mode (the catalog's steps, scheduler,
  guidance, a random LoRA of the published adapter's rank) with either decoder.
- ``compiled``: ``torch.compile`` (CUDA graphs with ``reduce-overhead``) with the persistent
  compile cache in ``--cache-dir``: warm-up time (a first start when the cache is empty), per
  image, images/s at queue depth 16, and a torch-profiler summary of the compiled call: GPU
  busy vs idle time per denoising step, the top kernels, and the CPU time spent in the
  scheduler step between graph replays.

Models are the real architectures with random weights (tests/support/architectures.py); PSNR
is against plain diffusers' image for the same seed (quantization) — with random weights it says
how far the arithmetic drifts, not how a trained model's picture changes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

from bench.seed_table import NEGATIVE, PROMPT, free, log, psnr, sync, timed_ms
from core.jobs import JobRequest
from settings.catalog import build_catalog
from tests.support.architectures import SIZES, UNETS, build_random_pipeline
from worker.generate import generate, generate_batch
from worker.optimize import SpeedOptions, optimize

FAST_TARGET_STEPS = 4  # issue 19's fast-mode targets (bk-sdm-small's catalog fast mode runs 12)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), so a start's figure includes the
    imports and the pipeline build, as a worker's restart does."""
    with open("/proc/self/stat") as stat:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        up_s = float(uptime.read().split()[0])
    return round(up_s - started_ticks / os.sysconf("SC_CLK_TCK"), 1)


def job(key: str, size: int, steps: int, seed: int = 0, count: int = 1, **extra) -> JobRequest:
    return JobRequest(job_id=f"g{seed}", model=key, prompt=f"{PROMPT} #{seed}", negative_prompt=NEGATIVE,
                      steps=steps, guidance=7.5, seed=seed, count=count, width=size, height=size, **extra)


def image_of(pipe, request: JobRequest, **kwargs) -> np.ndarray:
    return np.asarray(generate(pipe, request, **kwargs).images[0])


def quantization_for(device: torch.device) -> str:
    """fp8 where the GPU has float8 matrix units (Ada/Hopper), else int8."""
    from worker.quantize import supported

    return "fp8" if supported("fp8", device) else "int8"


# -- eager stage -------------------------------------------------------------------------------

def random_tiny_autoencoder(device: torch.device, dtype: torch.dtype):
    """TAESD's architecture (AutoencoderTiny's defaults) with random weights, on ``device``."""
    from diffusers import AutoencoderTiny

    with torch.device(device):
        return AutoencoderTiny().to(device, dtype).eval()


def decode_ms(pipe, device: torch.device, size: int, runs: int) -> tuple[float, float]:
    """Full VAE decode vs the tiny autoencoder (TAESD architecture, random weights) on the same
    latents, in the pipeline's dtype."""
    side = size // pipe.vae_scale_factor  # the latents the UNet makes at this image size
    latents = torch.randn(1, 4, side, side, device=device, dtype=pipe.unet.dtype)
    tiny = random_tiny_autoencoder(device, pipe.unet.dtype)
    with torch.inference_mode():
        vae_ms = timed_ms(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor), device, runs)
        tiny_ms = timed_ms(lambda: tiny.decode(latents), device, runs)
    return vae_ms, tiny_ms


def fast_mode_row(key: str, args, device: torch.device, dtype: torch.dtype, scratch: Path) -> dict:
    """The model's fast mode on a fresh pipeline with its adapter (a random LoRA of the published
    one's rank): per image with the full VAE and with the tiny autoencoder's decode."""
    from worker.pipelines import load_fast_adapter
    from worker.tiny import write_tiny_lora

    entry = build_catalog()[key]
    fast = entry.fast
    pipe = build_random_pipeline(key, device, dtype, tiny=args.tiny)
    if fast.adapter:
        local = entry.model_copy(update={"fast": fast.model_copy(update={
            "adapter": str(write_tiny_lora(scratch / key, pipe, rank=4 if args.tiny else 64))})})
        load_fast_adapter(pipe, local)
        fast = local.fast
    optimize(pipe, SpeedOptions(channels_last=True, fuse_qkv=not fast.adapter, fp16_vae=True))
    size = 64 if args.tiny else SIZES[key]
    guidance = entry.default_guidance if fast.guidance is None else fast.guidance
    quick = job(key, size, fast.steps, quality="fast").model_copy(update={"guidance": guidance})
    row = {"fast_steps": fast.steps, "fast_scheduler": fast.scheduler, "fast_guidance": guidance,
           "fast_ms": timed_ms(lambda: generate(pipe, quick, fast=fast), device, args.runs)}
    # Fast decode (worker.fast_decode): the tiny autoencoder decodes instead of the VAE.
    tiny = random_tiny_autoencoder(device, dtype)
    row["fast_tiny_decode_ms"] = timed_ms(lambda: generate(pipe, quick, fast=fast, decoder=tiny), device, args.runs)
    pipe = tiny = None  # the closures above hold them: release before the next model
    free(device)
    return row


def saved_weights(key: str, args) -> Path | None:
    """Where ``--weights-dir`` keeps ``key``'s random-weight pipeline (None: not asked)."""
    return Path(args.weights_dir) / key if args.weights_dir else None


def pipeline_of(key: str, args, device: torch.device, dtype: torch.dtype) -> tuple:
    """``key``'s random-weight pipeline and how it came: built; or, with ``--weights-dir`` holding
    it from an earlier start, loaded by the worker's own code (worker.pipelines.load_pipeline:
    ``from_pretrained`` on a local folder, then onto the device), so a restart's ready time is a
    real worker's restart: imports, weights from disk, warm-up."""
    folder = saved_weights(key, args)
    if folder is not None and (folder / "model_index.json").exists():
        from worker.pipelines import load_pipeline

        log(f"{key}: loading the weights an earlier start saved, as the worker loads them")
        entry = build_catalog()[key].model_copy(update={  # the folder holds every module, its VAE too
            "source": str(folder), "revision": None, "variant": None, "vae_source": None, "vae_revision": None,
            "fast": None})
        return load_pipeline(entry, device, dtype), "loaded"
    log(f"{key}: building")
    return build_random_pipeline(key, device, dtype, tiny=args.tiny), "built"


def save_weights(pipe, key: str, args) -> None:
    """After a build, for the next start to load (written aside, then renamed: a run cut short
    leaves no half folder)."""
    folder = saved_weights(key, args)
    if folder is None or folder.exists():
        return
    partial = folder.with_name(f".{folder.name}.partial")
    pipe.save_pretrained(partial)
    partial.rename(folder)


def plain_baseline(key: str, args, device: torch.device, dtype: torch.dtype) -> tuple:
    """A fresh pipeline of ``key``'s architecture, its row with plain diffusers' per-image time
    (the seed article's call), the job the row times, and that job's image before any option."""
    pipe, weights = pipeline_of(key, args, device, dtype)
    size = 64 if args.tiny else SIZES[key]
    one = job(key, size, args.steps)
    row: dict = {"model": key, "size": size, "steps": args.steps, "built_at_s": process_age_s(), "weights": weights}
    if weights == "built":
        save_weights(pipe, key, args)  # after built_at_s: no worker start saves weights
    log(f"{key}: plain diffusers")
    row["plain_ms"] = timed_ms(lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                                            height=size, width=size), device, args.runs)
    return pipe, row, one, image_of(pipe, one)


def eager_row(key: str, args, device: torch.device, dtype: torch.dtype, scratch: Path) -> dict:
    pipe, row, one, reference = plain_baseline(key, args, device, dtype)
    size = row["size"]
    row["vae_decode_ms_plain"] = decode_ms(pipe, device, size, args.runs)[0]

    log(f"{key}: eager worker path")
    optimize(pipe, SpeedOptions(channels_last=True, fuse_qkv=True, fp16_vae=True))
    row["eager_ms"] = timed_ms(lambda: generate(pipe, one), device, args.runs)
    row["eager_psnr"] = psnr(reference, image_of(pipe, one))
    row["vae_decode_ms"], row["tiny_decode_ms"] = decode_ms(pipe, device, size, args.runs)

    mode = quantization_for(device)
    log(f"{key}: eager + {mode} UNet")
    try:
        from worker.quantize import quantize_pipeline

        row["quantized"] = quantize_pipeline(pipe, mode)
        row["quantized_ms"] = timed_ms(lambda: generate(pipe, one), device, args.runs)
        row["quantized_psnr"] = psnr(reference, image_of(pipe, one))
    except Exception as error:  # a benchmark row records why, the run goes on
        row["quantized_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        log(f"{key}: quantization failed: {row['quantized_error']}")
    if device.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    pipe = None  # the closures above hold it: release before the next pipeline
    free(device)
    log(f"{key}: fast mode")
    try:
        row.update(fast_mode_row(key, args, device, dtype, scratch))
    except Exception as error:
        row["fast_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        log(f"{key}: fast mode failed: {row['fast_error']}")
    return row


# -- compiled stage ----------------------------------------------------------------------------

def profile_summary(pipe, request: JobRequest, device: torch.device, trace: Path | None) -> dict:
    """One profiled call of the compiled pipeline: wall time per denoising step, GPU busy time
    (union of kernel intervals) and idle time, kernel counts, and the CPU time of the scheduler
    step and the pipeline's Python between UNet calls."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from worker.fused_step import LinearStep

    scheduler_class = type(pipe.scheduler)
    original_step, original_fused = scheduler_class.step, LinearStep.__call__

    def step(self, *a, **k):
        if isinstance(self.step, LinearStep):  # the fused step's probe: inside its own range
            return original_step(self, *a, **k)
        with record_function("imagine::scheduler_step"):
            return original_step(self, *a, **k)

    def fused(self, *a, **k):
        with record_function("imagine::scheduler_step"):
            return original_fused(self, *a, **k)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    scheduler_class.step, LinearStep.__call__ = step, fused
    try:
        generate(pipe, request)  # untimed: the profiler's own first-call costs stay out
        with profile(activities=activities) as prof:
            with record_function("imagine::call"):
                generate(pipe, request)
            sync(device)
    finally:
        scheduler_class.step, LinearStep.__call__ = original_step, original_fused
    events = prof.events()
    call = next(e for e in events if e.name == "imagine::call")
    start, end = call.time_range.start, call.time_range.end
    # GPU activity: kernels, copies, memsets; not the GPU-side ranges of our own record_function
    # annotations, which span whole calls (counting them made the first H200 profile read 92 % busy).
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
                     and not getattr(e, "is_user_annotation", False) and not e.name.startswith("imagine::"))
    busy, cursor = 0.0, None
    for k_start, k_end, _ in kernels:  # union of intervals (overlapping streams counted once)
        if cursor is None or k_start > cursor:
            busy += k_end - k_start
            cursor = k_end
        elif k_end > cursor:
            busy += k_end - cursor
            cursor = k_end
    by_name: dict[str, list[float]] = {}
    for k_start, k_end, name in kernels:
        by_name.setdefault(name, []).append(k_end - k_start)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:8]
    steps = request.steps
    scheduler_us = sum(e.cpu_time_total for e in events if e.name == "imagine::scheduler_step")
    graph_launches = sum(1 for e in events if e.name in ("cudaGraphLaunch", "cuGraphLaunch"))
    wall_us = end - start
    summary = {
        "steps": steps, "wall_ms": round(wall_us / 1000, 2),
        "gpu_busy_ms": round(busy / 1000, 2), "gpu_idle_ms": round((wall_us - busy) / 1000, 2),
        "gpu_busy_fraction": round(busy / wall_us, 3) if wall_us else None,
        "wall_per_step_ms": round(wall_us / 1000 / steps, 3),
        "kernels": len(kernels), "kernels_per_step": round(len(kernels) / steps, 1),
        "graph_launches": graph_launches,
        "scheduler_step_cpu_ms_per_step": round(scheduler_us / 1000 / steps, 3),
        "top_kernels": [{"name": name[:120], "ms": round(sum(times) / 1000, 2), "count": len(times)}
                        for name, times in top],
    }
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return summary


def trace_summary(path: Path, steps: int) -> dict:
    """The same summary from a saved Chrome trace (``--trace``), on any machine: GPU kernel time
    against the profiled call's wall time, the idle gaps between kernels, kernel time by kind."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    call = next(e for e in events if e.get("name") == "imagine::call" and e.get("cat") == "user_annotation")
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")
    busy, cursor, gaps = 0.0, None, []
    for start, end, _ in kernels:
        if cursor is not None and start > cursor:
            gaps.append(start - cursor)
        busy += max(0.0, end - max(start, cursor or start))
        cursor = end if cursor is None else max(cursor, end)
    kinds: dict[str, float] = {}
    for start, end, name in kernels:
        kind = ("attention" if "sdpa" in name or "flash" in name else "convolution" if "fprop" in name
                else "matmul" if "nvjet" in name or "gemm" in name.lower() else
                "fused (triton)" if name.startswith("triton") else "other")
        kinds[kind] = kinds.get(kind, 0.0) + (end - start) / 1000
    wall = call["dur"] / 1000
    return {"steps": steps, "wall_ms": round(wall, 1), "kernel_busy_ms": round(busy / 1000, 1),
            "gpu_busy_fraction": round(busy / 1000 / wall, 3), "idle_ms": round(wall - busy / 1000, 1),
            "gaps_over_50us": sum(1 for g in gaps if g > 50),
            "gaps_over_50us_ms": round(sum(g for g in gaps if g > 50) / 1000, 1),
            "kernels": len(kernels), "kernel_ms_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items())}}


def compiled_row(key: str, args, device: torch.device, dtype: torch.dtype, first: bool) -> dict:
    """``first``: the process's first model, whose ready time is a worker start's."""
    pipe, row, one, reference = plain_baseline(key, args, device, dtype)
    size = row["size"]
    row.update(compile=args.compile, batch_sizes=args.batch_sizes, dynamic_batch=not args.static_batch)
    jobs = [job(key, size, args.steps, seed=i) for i in range(args.depth)]
    sync(device)
    started = time.perf_counter()
    for request in jobs:
        generate(pipe, request)
    sync(device)
    row["plain_img_per_s"] = round(len(jobs) / (time.perf_counter() - started), 2)

    quantize = args.quantize if args.quantize != "auto" else quantization_for(device)
    log(f"{key}: compile={args.compile}, quantize={quantize}; warm-up of batch sizes {args.batch_sizes}")
    started = time.perf_counter()
    optimize(pipe, SpeedOptions(channels_last=True, fuse_qkv=True, fp16_vae=True, compile=args.compile,
                                dynamic_batch=not args.static_batch,
                                **({"quantize": quantize} if quantize != "none" else {})))
    if args.compile == "none":  # the flow of a compiled worker for tests: with the fused step
        from worker import fused_step

        fused_step.mark(pipe.unet)
    for count in args.batch_sizes:  # as the worker warms up: short calls of each batch size
        generate_batch(pipe, [job(key, size, 2, seed=i) for i in range(count)])
    sync(device)
    row["warmup_s"] = round(time.perf_counter() - started, 1)
    if args.cache_dir:  # as the worker does after its warm-up
        from worker.compile_cache import cache_counts, save_compile_cache

        save_compile_cache(Path(args.cache_dir), args.models.split(","), args.compile)
        row["compile_cache"] = cache_counts()
    # A worker's start: imports + pipeline build + warm-up (the plain timings above left out).
    row["ready_s"] = round(row["built_at_s"] + row["warmup_s"], 1) if first else None
    row["quantize"] = quantize
    log(f"{key}: warm in {row['warmup_s']} s; timing")
    row["imagine_ms"] = timed_ms(lambda: generate(pipe, one), device, args.runs)
    row["psnr"] = psnr(reference, image_of(pipe, one))
    row.update(diffusers_step(pipe, one, device, args.runs, row["imagine_ms"]))
    row["speedup_1img"] = round(row["plain_ms"] / row["imagine_ms"], 2)
    batch = max(args.batch_sizes)
    sync(device)
    started = time.perf_counter()
    for i in range(0, len(jobs), batch):
        generate_batch(pipe, jobs[i:i + batch])
    sync(device)
    row["imagine_img_per_s"] = round(len(jobs) / (time.perf_counter() - started), 2)
    row["speedup_depth"] = round(row["imagine_img_per_s"] / row["plain_img_per_s"], 2)
    fast = build_catalog()[key].fast
    if fast is not None and not fast.adapter:  # same graphs as standard (a solver, CFG kept)
        quick = job(key, size, fast.steps, quality="fast")
        row["fast_steps"], row["fast_scheduler"] = fast.steps, fast.scheduler
        row["fast_ms"] = timed_ms(lambda: generate(pipe, quick, fast=fast), device, args.runs)
        if fast.steps != FAST_TARGET_STEPS:  # the issue's fast-mode targets are at 4 steps
            four = job(key, size, FAST_TARGET_STEPS, quality="fast")
            row["fast_4_steps_ms"] = timed_ms(lambda: generate(pipe, four, fast=fast), device, args.runs)
    if args.profile:
        log(f"{key}: profiling one compiled call")
        try:
            trace = Path(args.profile) / f"{key}.trace.json" if args.trace else None
            row["profile"] = profile_summary(pipe, one, device, trace)
        except Exception as error:
            row["profile_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if device.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    pipe = None  # the closures above hold it: release before the next pipeline
    free(device)
    return row


def diffusers_step(pipe, one: JobRequest, device: torch.device, runs: int, fused_ms: float) -> dict:
    """The same compiled pipeline with diffusers' own scheduler step instead of the fused one
    (worker.fused_step), side by side: what the fused step gains per image."""
    from worker import fused_step

    if not fused_step.wanted(pipe):
        return {}
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    delattr(unet, fused_step.MARKER)
    try:
        unfused = timed_ms(lambda: generate(pipe, one), device, runs)
    finally:
        fused_step.mark(pipe.unet)
    return {"diffusers_step_ms": unfused, "fused_step_gain": round(unfused / fused_ms, 3)}


# -- tables ------------------------------------------------------------------------------------

def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_eager(rows: list[dict]) -> None:
    print(f"{'model':<13}{'plain ms':>9}{'eager ms':>9}{'×':>6}{'quant':>6}{'q ms':>8}{'×':>6}{'q PSNR':>7}"
          f"{'VAE ms':>8}{'tiny ms':>8}{'fast ms':>8}{'fast+tiny':>10}")
    for r in rows:
        quant_ms = r.get("quantized_ms")
        print(f"{r['model']:<13}{fmt(r['plain_ms']):>9}{fmt(r['eager_ms']):>9}"
              f"{fmt(r['plain_ms'] / r['eager_ms'], '.2f'):>6}{r.get('quantized', '-'):>6}{fmt(quant_ms):>8}"
              f"{fmt(quant_ms and r['plain_ms'] / quant_ms, '.2f'):>6}{fmt(r.get('quantized_psnr')):>7}"
              f"{fmt(r['vae_decode_ms']):>8}{fmt(r['tiny_decode_ms']):>8}{fmt(r.get('fast_ms')):>8}"
              f"{fmt(r.get('fast_tiny_decode_ms')):>10}")


def print_compiled(rows: list[dict], depth: int) -> None:
    print(f"{'model':<13}{'quant':>6}{'plain ms':>9}{'imagine ms':>11}{'×':>6}{f'plain/s@{depth}':>12}"
          f"{f'imagine/s@{depth}':>14}{'×':>6}{'PSNR':>6}{'warm-up s':>10}{'ready s':>8}{'fast ms':>8}"
          f"{'fast@4 ms':>10}{'unfused ms':>11}{'weights':>8}")
    for r in rows:
        print(f"{r['model']:<13}{r['quantize']:>6}{fmt(r['plain_ms']):>9}{fmt(r['imagine_ms']):>11}"
              f"{fmt(r['speedup_1img'], '.2f'):>6}{fmt(r['plain_img_per_s'], '.2f'):>12}"
              f"{fmt(r['imagine_img_per_s'], '.2f'):>14}{fmt(r['speedup_depth'], '.2f'):>6}"
              f"{fmt(r['psnr']):>6}{fmt(r['warmup_s']):>10}{fmt(r['ready_s']):>8}{fmt(r.get('fast_ms')):>8}"
              f"{fmt(r.get('fast_4_steps_ms')):>10}{fmt(r.get('diffusers_step_ms')):>11}"
              f"{r.get('weights', 'built'):>8}")
        if "profile" in r:
            p = r["profile"]
            print(f"  profile: {p['wall_per_step_ms']} ms/step wall, GPU busy {p['gpu_busy_fraction']:.0%} "
                  f"({p['gpu_busy_ms']} of {p['wall_ms']} ms), {p['kernels_per_step']} kernels/step, "
                  f"{p['graph_launches']} graph launches, scheduler step {p['scheduler_step_cpu_ms_per_step']} "
                  f"ms CPU/step")


def main(argv: list[str] | None = None) -> dict:
    imported_at_s = process_age_s()  # interpreter start + this module's imports (torch, diffusers, worker)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["eager", "compiled"], required=True)
    parser.add_argument("--models", default=",".join(UNETS), help="comma-separated catalog keys")
    parser.add_argument("--tiny", action="store_true", help="tiny test configs (CPU/CI)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16, help="queued jobs for the throughput figure")
    parser.add_argument("--batch-sizes", default="1,16", help="compiled: images per call warmed (max: throughput)")
    parser.add_argument("--compile", default="reduce-overhead",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="compiled stage's torch.compile mode (none: the same flow eager, for tests)")
    parser.add_argument("--quantize", default="none", choices=["none", "fp8", "int8", "auto"],
                        help="compiled: the UNet quantized first (auto: fp8 where supported, else int8)")
    parser.add_argument("--cache-dir", help="compiled: persistent compile cache (worker.compile_cache)")
    parser.add_argument("--static-batch", action="store_true",
                        help="compiled: torch's default graphs (one for the first batch size, one dynamic for the "
                             "rest) instead of the worker's one dynamic-batch graph (IMAGINE_COMPILE_DYNAMIC_BATCH)")
    parser.add_argument("--weights-dir", help="keep each model's random weights here: built and saved when "
                                              "missing, else loaded as the worker loads weights (a restart)")
    parser.add_argument("--profile", help="compiled: profile one call; folder for the trace with --trace")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace per model")
    parser.add_argument("--json", help="write the report here after every model")
    parser.add_argument("--trace-summary", metavar="TRACE",
                        help="only summarise a saved Chrome trace (--trace) of a --steps call, then exit")
    if argv is None and "--trace-summary" in sys.argv:  # needs no --stage
        argv = sys.argv[1:] + ["--stage", "compiled"]
    args = parser.parse_args(argv)
    if args.trace_summary:
        summary = trace_summary(Path(args.trace_summary), args.steps)
        print(json.dumps(summary, indent=1))
        return summary
    args.batch_sizes = sorted({int(n) for n in args.batch_sizes.split(",")})
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.stage == "compiled" and args.cache_dir:
        from worker.compile_cache import use_compile_cache

        use_compile_cache(Path(args.cache_dir), args.models.split(","), args.compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, diffusers {diffusers.__version__}, {dtype}, "
          f"{args.steps} steps, CFG 7.5, {'tiny configs' if args.tiny else 'real architectures, random weights'}")
    report = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "stage": args.stage, "steps": args.steps, "imported_at_s": imported_at_s, "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        for key in args.models.split(","):
            if args.stage == "eager":
                row = eager_row(key, args, device, dtype, Path(scratch))
            else:
                row = compiled_row(key, args, device, dtype, first=not report["rows"])
            report["rows"].append(row)
            log(f"{key}: {json.dumps(row)}")
            free(device)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
    (print_eager if args.stage == "eager" else lambda rows: print_compiled(rows, args.depth))(report["rows"])
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
