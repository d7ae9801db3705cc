"""The tiny offline demo model (``worker.tiny``): random weights, so its images are noise. Its
folder carries a marker file, and every place that serves it says so plainly (worker log, web
page, launcher)."""

from __future__ import annotations

from pathlib import Path

RANDOM_WEIGHTS_MARKER = "imagine-random-weights.txt"  # in the model folder
NOTICE = "random weights: images are noise; set IMAGINE_WORKER_MODELS to a real model"


def random_weights(source: str) -> bool:
    """Whether ``source`` (a catalog entry's folder or hub id) is a random-weight demo model."""
    try:
        return (Path(source) / RANDOM_WEIGHTS_MARKER).is_file()
    except (OSError, ValueError):
        return False
