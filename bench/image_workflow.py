"""What each image action costs next to text-to-image of the same size, and what serving
img2img next to txt2img costs in memory (it must share the weights: diffusers' from_pipe).

    python -m bench.image_workflow                 # CPU, tiny pipelines: the tables in docs/benchmarks.md
    python -m bench.image_workflow --memory-arch bk-sdm-small   # memory on the real architecture

Time: one process, SD and SDXL tiny pipelines, every action at the same steps, each row's
median of ``--runs`` calls after a warm-up, and its ratio to txt2img at the same output size
(Upscale ×2 against txt2img at the doubled size). Memory: one subprocess per case builds the
pipeline (``--memory-arch``: a seed model's real architecture with random weights, so a second
copy of the weights would show; ``tiny`` for the tiny one), runs its actions and reports its
peak RSS: txt2img only; txt2img + img2img (from_pipe, the worker's way); and, as a control,
txt2img + img2img from a second copy of the weights (what not sharing would cost).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.jobs import JobRequest, SourceImage
from core.validation import UPSCALE_FACTOR, UPSCALE_STRENGTH, VARY_STRENGTHS
from settings.catalog import ModelEntry
from worker.generate import Sources, generate, img2img_pipeline
from worker.source_image import SourceInput, fit

CPU = torch.device("cpu")
URL = "https://cdn.discordapp.com/attachments/1/2/source.png"


def job(mode: str, width: int, height: int, steps: int, strength: float | None = None, **extra) -> JobRequest:
    source = None if mode == "txt2img" else SourceImage(url=URL)
    return JobRequest(job_id="bench", model="tiny", prompt="a lighthouse at dusk, oil painting",
                      negative_prompt="blurry", steps=steps, guidance=7.5, seed=7, width=width, height=height,
                      mode=mode, source=source, strength=strength, **extra)


def median_ms(calls: list, runs: int) -> list[float]:
    """Each call's median time over ``runs``, the calls interleaved round by round (after one
    warm-up each), so a shared machine's load changes hit every case alike."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, spent in zip(calls, times):
            started = time.perf_counter()
            call()
            spent.append((time.perf_counter() - started) * 1000)
    return [statistics.median(spent) for spent in times]


def time_actions(pipe, native: int, size: int, steps: int, runs: int) -> list[dict]:
    image_pipe = img2img_pipeline(pipe)
    source = generate(pipe, job("txt2img", size, size, steps)).images[0]
    big = size * UPSCALE_FACTOR

    def sources(request: JobRequest) -> Sources:
        return Sources({request.job_id: SourceInput(fit(source, request.width, request.height), "0" * 64,
                                                    source.size)}, native)

    cases = [("txt2img", "txt2img", None, size), ("img2img (0.6)", "img2img", 0.6, size),
             ("vary subtle", "vary", VARY_STRENGTHS["subtle"], size),
             ("vary strong", "vary", VARY_STRENGTHS["strong"], size),
             ("txt2img ×2 size", "txt2img", None, big), ("upscale ×2", "upscale", UPSCALE_STRENGTH, big)]
    calls = []
    for _name, mode, strength, side in cases:
        request = job(mode, side, side, steps, strength)
        if mode == "txt2img":
            calls.append(lambda request=request: generate(pipe, request))
        else:
            calls.append(lambda request=request: generate(image_pipe, request, sources=sources(request)))
    spent = median_ms(calls, runs)
    baseline = {side: ms for (_n, mode, _s, side), ms in zip(cases, spent) if mode == "txt2img"}
    return [{"action": name, "output": f"{side}×{side}", "ms": round(ms, 1),
             "vs_txt2img": round(ms / baseline[side], 2)} for (name, _m, _s, side), ms in zip(cases, spent)]


def serve(case: str, arch: str, steps: int, size: int) -> dict:
    """One memory case in this (fresh) process; its peak RSS."""
    from tests.support.architectures import build_random_pipeline

    pipe = build_random_pipeline(arch if arch != "tiny" else "bk-sdm-small", CPU, torch.float32, tiny=arch == "tiny")
    generate(pipe, job("txt2img", size, size, steps))
    if case != "txt2img":
        base = copy.deepcopy(pipe) if case == "copy" else pipe  # the control: a second set of weights
        image_pipe = img2img_pipeline(base)
        request = job("img2img", size, size, steps, 0.6)
        source = SourceInput(generate(pipe, job("txt2img", size, size, steps)).images[0], "0" * 64, (size, size))
        generate(image_pipe, request, sources=Sources({request.job_id: source}, size))
        generate(pipe, job("txt2img", size, size, steps))
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values()
                  if isinstance(m, torch.nn.Module) for p in m.parameters())
    return {"case": case, "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "weights_mib": round(weights / 2**20, 1)}


def memory(arch: str, steps: int, size: int) -> list[dict]:
    rows = []
    for case in ("txt2img", "txt2img+img2img", "copy"):
        done = subprocess.run([sys.executable, "-m", "bench.image_workflow", "--serve", case, "--memory-arch", arch,
                               "--steps", str(steps), "--memory-size", str(size)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="txt2img/img2img side; upscale goes to twice it")
    parser.add_argument("--memory-arch", default="bk-sdm-small",
                        help="architecture of the memory cases: a seed model key, or tiny")
    parser.add_argument("--memory-size", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timed part")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.serve:
        print(json.dumps(serve(args.serve, args.memory_arch, args.steps, args.memory_size)))
        return 0
    from worker.pipelines import load_pipeline
    from worker.tiny import write_tiny_pipeline

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results: dict = {"steps": args.steps, "runs": args.runs, "time": {}, "memory": []}
    if not args.no_time:
        print(f"CPU ({args.threads} thread), tiny pipelines: ms per call (median of {args.runs}, cases "
              f"interleaved), {args.steps} steps, guidance 7.5, 1 image; ratio to txt2img at the same output size")
    with tempfile.TemporaryDirectory() as scratch:
        for family, xl in () if args.no_time else (("SD 1.x", False), ("SDXL", True)):
            folder = write_tiny_pipeline(Path(scratch) / family.replace(" ", ""), xl=xl)
            entry = ModelEntry(key="tiny", source=str(folder), native_size=64,
                               pipeline="StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
            pipe = load_pipeline(entry, CPU, torch.float32)
            rows = time_actions(pipe, entry.native_size, args.size, args.steps, args.runs)
            results["time"][family] = rows
            print(f"\n{family} (tiny, native 64 px: the upscale runs in tiles)")
            print(f"{'action':<18}{'output':>10}{'ms/call':>10}{'× txt2img':>11}")
            for row in rows:
                print(f"{row['action']:<18}{row['output']:>10}{row['ms']:>10.1f}{row['vs_txt2img']:>11.2f}")
    if not args.no_memory:
        results["memory"] = memory(args.memory_arch, args.memory_steps, args.memory_size)
        print(f"\nPeak RSS of a worker process ({args.memory_arch} architecture, random weights, fp32, CPU, "
              f"{args.memory_size} px, {args.memory_steps} steps)")
        print(f"{'serving':<34}{'max RSS MiB':>12}{'weights MiB':>13}")
        labels = {"txt2img": "txt2img only", "txt2img+img2img": "txt2img + img2img (from_pipe)",
                  "copy": "control: img2img on a weight copy"}
        for row in results["memory"]:
            print(f"{labels[row['case']]:<34}{row['max_rss_mib']:>12.1f}{row['weights_mib']:>13.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
