"""The model catalog: which pipelines exist, where their weights live and their defaults.

Operators add or override entries without code through ``IMAGINE_MODELS`` (JSON), e.g.
``{"my-model": {"source": "/models/my-model", "pipeline": "StableDiffusionPipeline"}}`` or
``{"sd-v1-4": {"source": "/mnt/weights/sd-v1-4"}}`` to load a local copy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PipelineName = Literal["StableDiffusionPipeline", "StableDiffusionXLPipeline"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,40}$")
    source: str  # hub id ("owner/name") or a local directory written by save_pretrained
    pipeline: PipelineName
    native_size: int = 512
    default_steps: int = 30
    default_guidance: float = 7.5
    variant: str | None = "fp16"  # weight variant to ask for on GPU (fp16 files); none on CPU
    revision: str | None = None
    # An fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix) replaces the pipeline's VAE, so SDXL
    # decodes in half precision instead of upcasting to fp32.
    vae_source: str | None = None
    description: str = ""


BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        key="bk-sdm-small",
        source="nota-ai/bk-sdm-small",
        pipeline="StableDiffusionPipeline",
        native_size=512,
        variant=None,  # the repo ships no fp16 variant; weights are cast at load
        description="BK-SDM small: SD v1.4 distilled, blocks removed",
    ),
    ModelEntry(
        key="sd-v1-4",
        source="CompVis/stable-diffusion-v1-4",
        pipeline="StableDiffusionPipeline",
        native_size=512,
        description="Stable Diffusion v1.4 (teacher of bk-sdm-small)",
    ),
    ModelEntry(
        key="ssd-1b",
        source="segmind/SSD-1B",
        pipeline="StableDiffusionXLPipeline",
        native_size=1024,
        description="Segmind SSD-1B: SDXL distilled",
    ),
    ModelEntry(
        key="sdxl-base",
        source="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline",
        native_size=1024,
        description="Stable Diffusion XL base 1.0 (teacher of ssd-1b)",
    ),
)


def build_catalog(overrides: dict[str, dict] | None = None) -> dict[str, ModelEntry]:
    """Built-in entries, each updated or added from ``overrides`` (key → fields)."""
    catalog = {entry.key: entry for entry in BUILTIN_MODELS}
    for key, fields in (overrides or {}).items():
        base = catalog[key].model_dump() if key in catalog else {}
        catalog[key] = ModelEntry.model_validate({**base, **fields, "key": key})
    return catalog
