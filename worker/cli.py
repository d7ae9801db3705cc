"""Generate images locally through the worker's generation code — no Discord, no Redis.

    python -m worker.cli "an orange cat" --model bk-sdm-small --seed 7 --out cat.png
    python -m worker.cli "a watercolour" --image photo.jpg --strength 0.6 --out paint.png
    python -m worker.cli "a watercolour" --image paint.png --upscale --out paint-2x.png

The model is loaded and optimized as the worker does it, from the same IMAGINE_* settings
(device, compile, quantization, fast decode: worker.pipelines.resident_pipelines). A PNG
output carries the generation record as text, like the worker's attachments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.jobs import IMAGE_MODES, SourceImage
from core.validation import (
    ImagineOptions,
    InvalidRequest,
    build_request,
    upscale_dimensions,
)
from settings.config import load_settings

if TYPE_CHECKING:
    from PIL.Image import Image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images with an Imagine model")
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", type=int, help="a square of this side (see --aspect, --width/--height)")
    parser.add_argument("--aspect", help="aspect ratio, e.g. 16:9 (sized for the model)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--image", type=Path, help="a source image: image-to-image (img2img)")
    parser.add_argument("--strength", type=float, help="img2img strength, above 0 and at most 1")
    parser.add_argument("--upscale", action="store_true", help="with --image: Upscale ×2 of it")
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
    source = None
    if args.image is not None or args.upscale:
        from core.jobs import InputImageError
        from worker.source_image import from_file

        if args.image is None:
            print("error: --upscale needs --image", file=sys.stderr)
            return 2
        try:
            source = from_file(args.image, None, None, settings)
        except (InputImageError, OSError) as error:
            print(f"error: --image {args.image}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
            return 2
    width, height = args.width, args.height
    if args.upscale and width is None and height is None:
        width, height = upscale_dimensions(*source.original_size)
    # Local files are not uploads: the job names a placeholder source; the image is passed in.
    source_ref = None if source is None else SourceImage(image_key=f"local:{args.image.name}",
                                                         width=source.original_size[0],
                                                         height=source.original_size[1])
    options = ImagineOptions(prompt=args.prompt, negative_prompt=args.negative_prompt,
                             model=args.model, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, size=args.size, count=args.count, quality=args.quality,
                             aspect=args.aspect, width=width, height=height, source=source_ref,
                             strength=args.strength, mode="upscale" if args.upscale else "txt2img")
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
    from worker.generate import generate, reproducibility
    from worker.pipelines import ModelLoadError, resident_pipelines

    entry = catalog[request.model]
    try:
        # Built as the worker builds its own, from the same settings (IMAGINE_COMPILE,
        # IMAGINE_QUANTIZE, IMAGINE_FAST_DECODE, the compile cache …): a local run is a job's run.
        pipelines = resident_pipelines(settings, [entry.key])
        pipelines.load(entry)
        pipe = pipelines.get_img2img(entry.key) if request.mode in IMAGE_MODES else pipelines.get(entry.key)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sources = None
    if source is not None:
        from worker.generate import Sources
        from worker.source_image import SourceInput, fit

        fitted = SourceInput(fit(source.image, request.width, request.height), source.sha256, source.original_size)
        sources = Sources({request.job_id: fitted}, entry.native_size)
    generation = generate(pipe, request, fast=entry.fast, sources=sources, decoder=pipelines.final_decoder(entry.key))
    record = reproducibility(entry, pipe, request, generation)
    for path, image, seed in zip(output_paths(args.out, request.count), generation.images, generation.seeds):
        try:
            save_image(image, path, record.png_text(seed))
        except OSError as error:
            print(f"error: cannot write {path} ({error.strerror or error})", file=sys.stderr)
            return 1
        print(f"{path}  seed={seed}")
    if source is not None:
        print(f"{request.mode} from {args.image} (sha256 {source.sha256[:12]}, strength {request.strength:g})")
    print(f"pipeline: {record.pipeline}")  # names the tiny autoencoder (fast decode) and quantization
    print(f"inference {generation.inference_ms:.0f} ms on {pipelines.device}")
    return 0


def save_image(image: Image, path: Path, text: dict[str, str]) -> None:
    """A PNG carries the generation record as text, like the worker's attachments (worker.images)."""
    if path.suffix.lower() == ".png":
        from worker.images import png_bytes

        path.write_bytes(png_bytes(image, text))
    else:
        image.save(path)


if __name__ == "__main__":
    sys.exit(main())
