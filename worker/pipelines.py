"""Load diffusers pipelines once and keep them resident on the device across jobs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import DiffusionPipeline

from settings.catalog import ModelEntry

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp16 on GPU, fp32 on CPU (CPU half precision is slow and poorly supported)."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


class ModelLoadError(RuntimeError):
    """Weights missing or unreadable; the message is one line for operators."""


def load_pipeline(entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """``from_pretrained`` on a hub id or a local directory, moved to ``device``."""
    pipeline_class = getattr(diffusers, entry.pipeline)
    kwargs: dict = {"dtype": dtype, "revision": entry.revision}
    if dtype == torch.float16 and entry.variant:
        kwargs["variant"] = entry.variant  # fetch the half-size fp16 files where the repo has them
    log.info("loading %s from %s (%s on %s)", entry.key, entry.source, dtype, device)
    try:
        pipe = pipeline_class.from_pretrained(entry.source, **kwargs)
    except (OSError, ValueError) as error:  # missing files, unreachable hub, bad repo id
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {entry.key!r} from {entry.source}: {first_line}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class ResidentPipelines:
    """The pipelines a worker serves, loaded at start and kept on the device."""

    device: torch.device
    dtype: torch.dtype
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    pipes: dict[str, DiffusionPipeline] = field(default_factory=dict)

    def load(self, entry: ModelEntry) -> None:
        self.pipes[entry.key] = load_pipeline(entry, self.device, self.dtype)
        self.entries[entry.key] = entry

    def get(self, key: str) -> DiffusionPipeline:
        try:
            return self.pipes[key]
        except KeyError:
            raise LookupError(f"model {key!r} is not loaded on this worker") from None

    def keys(self) -> list[str]:
        return list(self.pipes)
