"""Generate images locally through the worker's generation code — no Discord, no Redis.

    python -m worker.cli "an orange cat" --model bk-sdm-small --seed 7 --out cat.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.validation import ImagineOptions, InvalidRequest, build_request
from settings.config import load_settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images with an Imagine model")
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--quality", choices=["standard", "fast"], help="fast: the model's fast-mode configuration")
    parser.add_argument("--out", type=Path, default=Path("imagine.png"),
                        help="output file; with --count N, -1…-N are added before the suffix")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line
    return parser.parse_args(argv)


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]


def check_output(out: Path) -> str | None:
    """Why ``out`` cannot take the images (checked before minutes of generation), or None."""
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        return f"--out {out}: use an image file extension such as .png or .jpg"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out}: cannot create {out.parent} ({error.strerror or error})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    catalog = settings.catalog()
    options = ImagineOptions(prompt=args.prompt, negative_prompt=args.negative_prompt,
                             model=args.model, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, size=args.size, count=args.count, quality=args.quality)
    try:
        request = build_request(options, job_id="cli", settings=settings, catalog=catalog)
    except InvalidRequest as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (problem := check_output(args.out)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    # Imported here so that option errors answer instantly, before torch loads.
    from worker.generate import generate
    from worker.pipelines import (
        ModelLoadError,
        load_pipeline,
        resolve_device,
        resolve_dtype,
    )

    try:
        device = resolve_device(settings.device)
        pipe = load_pipeline(catalog[request.model], device, resolve_dtype(settings.dtype, device))
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    generation = generate(pipe, request, fast=catalog[request.model].fast)
    for path, image, seed in zip(output_paths(args.out, request.count), generation.images, generation.seeds):
        try:
            image.save(path)
        except OSError as error:
            print(f"error: cannot write {path} ({error.strerror or error})", file=sys.stderr)
            return 1
        print(f"{path}  seed={seed}")
    print(f"inference {generation.inference_ms:.0f} ms on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
