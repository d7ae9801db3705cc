"""Cold start of a compiled worker: the same start twice, in fresh processes sharing one compile
cache directory (worker.compile_cache). The first finds it empty and compiles every warm-up
shape; the second is a restart on the same host and loads them.

    python -m bench.cold_start --tiny                    # CPU, tiny pipeline, compile "default"
    python -m bench.cold_start --real --device cuda --model bk-sdm-small \\
        --compile reduce-overhead --batch-sizes 1,2,3,4,5,6,7,8

"Ready" is what the worker waits for before it registers: process start (imports included),
the pipeline built (random weights: no download), optimized (worker.pipelines), and every
warm-up shape run through ``worker.main.warm_up`` (standard and fast mode, as the worker does),
then the cache saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPAWNED = "COLD_START_SPAWNED"  # the parent's clock when it started the child (time.time())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def settings_for(args: argparse.Namespace):
    from settings.config import Settings

    sizes = [int(n) for n in args.batch_sizes.split(",")] if args.batch_sizes else None
    return Settings(_env_file=None, device=args.device, compile=args.compile, compile_batch_sizes=sizes,
                    max_batch_images=args.max_batch_images, worker_models=[args.model])


def one_start(args: argparse.Namespace) -> dict:
    """In the child: build, optimize and warm up like ``worker.main.load_pipelines`` (the weights
    are random, so the pipeline is built rather than loaded), timed from process start."""
    import torch

    from tests.support.architectures import build_random_pipeline
    from worker.compile_cache import cache_counts, save_compile_cache, use_compile_cache
    from worker.main import warm_up, warm_up_shapes
    from worker.pipelines import (
        ResidentPipelines,
        resolve_device,
        resolve_dtype,
        speed_options,
        weight_bytes,
    )

    settings = settings_for(args)
    # As load_pipelines does (worker.pipelines.resident_pipelines), before anything compiles.
    use_compile_cache(args.cache_dir, [args.model], args.compile)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    entry = settings.catalog()[args.model]
    if args.tiny:
        entry = entry.model_copy(update={"native_size": 64})
    pipelines = ResidentPipelines(device=device, dtype=dtype, speed=speed_options(settings))
    pipelines.pipes[entry.key] = build_random_pipeline(entry.key, device, dtype, tiny=args.tiny)
    pipelines.entries[entry.key] = entry
    pipelines.on_device[entry.key] = weight_bytes(pipelines.pipes[entry.key])
    pipelines._optimize(entry.key)  # the worker's own step after loading
    warm_started = time.perf_counter()
    warm_up(pipelines, settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warm_up_s = time.perf_counter() - warm_started
    save_compile_cache(args.cache_dir, [args.model], args.compile)
    return {"ready_s": round(time.time() - float(os.environ[SPAWNED]), 1), "warm_up_s": round(warm_up_s, 1),
            "shapes": warm_up_shapes(settings, entry), "cache": cache_counts(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "dynamic_batch": settings.compile_dynamic_batch}


def child_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    Path(args.result).write_text(json.dumps(one_start(args)))


def run_start(args: argparse.Namespace, result: Path) -> dict:
    """One start in a fresh interpreter (nothing compiled in memory), its log passed through."""
    argv = ["--real" if args.real else "--tiny", "--device", args.device, "--model", args.model,
            "--compile", args.compile, "--max-batch-images", str(args.max_batch_images),
            "--cache-dir", str(args.cache_dir), "--child", "--result", str(result)]
    if args.batch_sizes:
        argv += ["--batch-sizes", args.batch_sizes]
    env = {**os.environ, SPAWNED: repr(time.time()), "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "bench.cold_start", *argv], env=env, check=True)
    return json.loads(result.read_text())


def print_table(report: dict) -> None:
    first, cached = report["starts"]
    hits = cached["cache"]["fxgraph_hit"]
    graphs = hits + cached["cache"]["fxgraph_miss"]
    warm = f"{first['warm_up_s']:.1f} / {cached['warm_up_s']:.1f}"
    print(f"{'first start s':>14}{'cached start s':>16}{'ratio':>7}{'FX graph hits (2nd)':>21}"
          f"{'warm-up s 1st / 2nd':>21}")
    print(f"{first['ready_s']:>14.1f}{cached['ready_s']:>16.1f}{first['ready_s'] / cached['ready_s']:>7.1f}"
          f"{f'{hits}/{graphs}':>21}{warm:>21}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--tiny", action="store_true", help="tiny random pipeline on the CPU (the default)")
    kind.add_argument("--real", action="store_true", help="the model's real architecture, random weights")
    parser.add_argument("--device", default=None, help="default: cpu with --tiny, cuda with --real")
    parser.add_argument("--model", default="bk-sdm-small", help="catalog key (its architecture)")
    parser.add_argument("--compile", default=None, choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="default: 'default' with --tiny, reduce-overhead with --real (none: the flow "
                             "without compiling, for tests)")
    parser.add_argument("--batch-sizes", default=None,
                        help="images-per-call counts warmed, comma-separated (IMAGINE_COMPILE_BATCH_SIZES); "
                             "default: 1,2 with --tiny, 1..--max-batch-images with --real")
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="an empty directory to use (kept); default: a temporary one, removed after")
    parser.add_argument("--json", help="write the results here after each start")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tiny = not args.real
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.compile = args.compile or ("default" if args.tiny else "reduce-overhead")
    if args.tiny and args.batch_sizes is None:
        args.batch_sizes = "1,2"
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.child:
        child_main(args)
        return None
    keep = args.cache_dir is not None
    if keep and args.cache_dir.exists() and any(args.cache_dir.iterdir()):
        raise SystemExit(f"error: {args.cache_dir} is not empty: the first start would not be cold")
    args.cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="imagine-compile-cache-"))
    report = {"model": args.model, "tiny": args.tiny, "device": args.device, "compile": args.compile,
              "batch_sizes": args.batch_sizes, "max_batch_images": args.max_batch_images, "starts": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for label in ("first (empty cache)", "cached (restart)"):
                log(f"start {len(report['starts']) + 1}: {label}, cache {args.cache_dir}")
                start = run_start(args, Path(scratch, "result.json"))
                report["starts"].append(start)
                log(f"ready in {start['ready_s']} s (warm-up {start['warm_up_s']} s, cache {start['cache']})")
                if args.json:  # after each start, so a run cut short keeps the first figure
                    Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not keep:
            shutil.rmtree(args.cache_dir, ignore_errors=True)
    first, cached = report["starts"]
    report["ratio"] = round(first["ready_s"] / cached["ready_s"], 2)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"{first['device']}, torch {first['torch']}, {args.model}{' (tiny)' if args.tiny else ''}, "
          f"compile={args.compile}, dynamic batch {'on' if first['dynamic_batch'] else 'off'} "
          f"(IMAGINE_COMPILE_DYNAMIC_BATCH), {len(first['shapes'])} shape(s) × modes warmed")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
