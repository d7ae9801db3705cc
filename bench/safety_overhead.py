"""What the output classifier costs per image, side by side with generating that image: the
tiny pipeline's jobs, then ``worker.safety`` on the job's images in one batched call — with the
tiny random classifier, and with the real classifier's architecture (CLIP ViT-L/14 at 224 px,
random weights: the same FLOPs as the published checker, no download).

    python -m bench.safety_overhead [--runs 5] [--count 4] [--steps 30] [--size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor

from core.jobs import JobRequest
from settings.catalog import ModelEntry
from settings.config import Settings
from worker.generate import generate
from worker.pipelines import load_pipeline
from worker.safety import SafetyChecker, load_safety_checker
from worker.tiny import write_tiny_pipeline


def vit_l_checker(device: torch.device, dtype: torch.dtype) -> SafetyChecker:
    """The published checker's shapes (CompVis safety_checker/config.json: ViT-L/14 vision
    tower, projection 768) with random weights."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    config = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                           num_hidden_layers=24, patch_size=14, image_size=224),
                        projection_dim=768)
    model = StableDiffusionSafetyChecker(config).to(device, dtype).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return SafetyChecker(model, processor, device, dtype, 0.0, "vit-l/14 (random)")


def ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=4, help="images per job (one batched check)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a busy host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    folder = write_tiny_pipeline(Path(tempfile.mkdtemp(prefix="imagine-bench-")) / "tiny")
    pipe = load_pipeline(ModelEntry(key="tiny", source=str(folder), pipeline="StableDiffusionPipeline"), device, dtype)
    request = JobRequest(job_id="bench", model="tiny", prompt="an orange cat", steps=args.steps, guidance=7.5,
                         seed=0, size=args.size, count=args.count)
    images = generate(pipe, request).images
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generation_ms = ms(lambda: (generate(pipe, request), sync()), args.runs)
    checkers = {"tiny random": load_safety_checker(Settings(_env_file=None, safety_source=str(folder)), device, dtype),
                "ViT-L/14 (published shapes)": vit_l_checker(device, dtype)}
    rows = {"device": str(device), "images_per_job": args.count, "steps": args.steps, "size": args.size,
            "generation_ms_per_image (tiny pipeline)": round(generation_ms / args.count, 2)}
    for name, checker in checkers.items():
        checker.scores(images)  # warm
        check_ms = ms(lambda: (checker.scores(images), sync()), args.runs)
        rows[f"check_ms_per_image ({name})"] = round(check_ms / args.count, 2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
