"""The model catalog: which pipelines exist, where their weights live and their defaults.

Operators add or override entries without code through ``IMAGINE_MODELS`` (JSON), e.g.
``{"my-model": {"source": "/models/my-model", "pipeline": "StableDiffusionPipeline"}}`` or
``{"sd-v1-4": {"source": "/mnt/weights/sd-v1-4"}}`` to load a local copy. A nested ``fast``
object is merged field by field: ``{"sd-v1-4": {"fast": {"adapter": "/models/lcm-lora-sdv1-5"}}}``
changes only where the adapter comes from; ``{"ssd-1b": {"fast": null}}`` turns fast mode off.

The built-in entries name companion weights on the hub: an fp16-safe VAE for the SDXL models
(``vae_source``) and a tiny autoencoder for every model (``tiny_vae_source``: TAESD / TAESDXL,
used for decoded previews and IMAGINE_FAST_DECODE). They belong to the built-in ``source``: an
override that changes ``source`` (a local copy, a fine-tune) drops them unless it names them
itself, so ``{"ssd-1b": {"source": "/mnt/ssd-1b"}}`` downloads no VAE (fast mode's ``adapter``
is not a companion: override it too, or ``"fast": null``, on an offline host), and
``{"ssd-1b": {"source": "/mnt/ssd-1b", "vae_source": "/mnt/sdxl-vae-fp16-fix"}}`` keeps the
fp16-safe VAE from a local copy. ``null`` turns one off: ``{"sd-v1-4": {"tiny_vae_source": null}}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PipelineName = Literal["StableDiffusionPipeline", "StableDiffusionXLPipeline"]
# Schedulers fast mode may run (diffusers class names): LCM for a latent-consistency adapter,
# the multistep solvers for a model with no adapter that fits.
FastScheduler = Literal["LCMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
Quality = Literal["standard", "fast"]
Quantize = Literal["none", "fp8", "int8", "auto"]  # ModelEntry.quantize (worker.quantize)
QUALITIES: tuple[str, ...] = ("standard", "fast")


class FastMode(BaseModel):
    """How ``quality: fast`` runs one model (docs/operations.md, "Fast mode").

    With ``adapter``: a step-distillation LoRA (Latent Consistency LoRA), loaded once at worker
    start as a peft adapter that is switched on only for fast jobs, with ``LCMScheduler``.
    Without: the model's own weights with a multistep solver at fewer steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: str | None = None  # hub id or local directory holding pytorch_lora_weights.safetensors
    adapter_revision: str | None = None  # a hub commit (pin it) or branch; None: the default branch
    adapter_weight_name: str | None = None  # file name inside ``adapter`` when not the default
    scheduler: FastScheduler = "LCMScheduler"
    steps: int = Field(default=4, ge=1, le=150)
    guidance: float | None = Field(default=1.0, ge=0)  # None: the model's default guidance
    # The highest guidance the configuration gives usable images at (LCM: 1–2). A server whose
    # forced negative prompt needs more (IMAGINE_FORCED_NEGATIVE_MIN_GUIDANCE) refuses fast mode.
    max_guidance: float | None = Field(default=2.0, ge=0)

    @model_validator(mode="after")
    def _lcm_needs_adapter(self) -> "FastMode":
        if self.scheduler == "LCMScheduler" and not self.adapter:
            raise ValueError("fast mode with LCMScheduler needs a latent-consistency `adapter`")
        return self

    @property
    def label(self) -> str:
        """What results and ℹ Info name: the adapter, else the solver."""
        return f"LCM-LoRA {self.adapter}" if self.adapter else f"{self.scheduler} (no adapter)"



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
    vae_revision: str | None = None  # a hub commit (pin it) or branch of vae_source; None: the default branch
    # A tiny autoencoder (diffusers AutoencoderTiny: TAESD for SD 1.x, TAESDXL for SDXL; hub id or
    # local folder): decoded progress previews and, with IMAGINE_FAST_DECODE, the final decode.
    tiny_vae_source: str | None = None
    tiny_vae_revision: str | None = None
    description: str = ""
    fast: FastMode | None = None  # None: no fast mode for this model (``quality: fast`` refused)
    # Low-precision UNet linears (worker.quantize, torchao): "auto" is fp8 where the GPU has fp8
    # tensor cores (compute capability 8.9+), else none. IMAGINE_QUANTIZE overrides it per worker.
    quantize: Quantize = "none"

    @property
    def family(self) -> Family:
        """SD 1.x or SDXL (which picks the aspect-ratio sizes: core.validation.dimensions_for)."""
        return "sdxl" if self.pipeline == "StableDiffusionXLPipeline" else "sd1"


Family = Literal["sd1", "sdxl"]
# The resolution buckets SDXL was trained on (SDXL paper, appendix; ~1024² pixels each, sides
# multiples of 64), width × height. A 1024-native SDXL-family model gets the nearest bucket for
# an aspect ratio; SD 1.x models (and SDXL-family models of another native size) get multiples
# of 64 near their native pixel count.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
    (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
SDXL_BUCKET_NATIVE = 1024


# Companion weights of the built-in models (hub ids). Not pinned to a commit (vae_revision,
# tiny_vae_revision stay None: no verified commit here); pin one with IMAGINE_MODELS, e.g.
# {"ssd-1b": {"vae_revision": "<commit>"}}. SDXL_FP16_VAE: the SDXL VAE fine-tuned to decode in
# fp16 without overflow (ssd-1b and sdxl-base share SDXL's VAE, so it fits both).
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
TAESD = "madebyollin/taesd"  # tiny autoencoder for SD 1.x latents
TAESDXL = "madebyollin/taesdxl"  # tiny autoencoder for SDXL latents
# Dropped by an override that changes ``source`` unless it names them (module docstring).
COMPANIONS = ("vae_source", "vae_revision", "tiny_vae_source", "tiny_vae_revision")

# Revisions: hub commits (reproducible builds; issue 18). An override's own "revision" (or null:
# the default branch) replaces them; a local folder ignores them.
BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        key="bk-sdm-small",
        source="nota-ai/bk-sdm-small",
        revision="572238db7ed3a10858900803f3fc8cca53e893e0",  # hub commit: the same weights on every host
        pipeline="StableDiffusionPipeline",
        native_size=512,
        variant=None,  # the repo ships no fp16 variant; weights are cast at load
        description="BK-SDM small: SD v1.4 distilled, blocks removed",
        tiny_vae_source=TAESD,
        # No LCM-LoRA fits: the SD 1.5 one is shaped for the full UNet, and loading it into this
        # one fails on the layers whose shapes changed (docs/operations.md, "Fast mode"). A
        # multistep solver at fewer steps instead; CFG kept, so negatives work as usual.
        fast=FastMode(scheduler="DPMSolverMultistepScheduler", steps=12, guidance=None, max_guidance=None),
    ),
    ModelEntry(
        key="sd-v1-4",
        source="CompVis/stable-diffusion-v1-4",
        revision="133a221b8aa7292a167afc5127cb63fb5005638b",  # hub commit: the same weights on every host
        pipeline="StableDiffusionPipeline",
        native_size=512,
        description="Stable Diffusion v1.4 (teacher of bk-sdm-small)",
        tiny_vae_source=TAESD,
        # Trained on SD 1.5, which shares v1.4's architecture and its v1-2 ancestor.
        fast=FastMode(adapter="latent-consistency/lcm-lora-sdv1-5"),
    ),
    ModelEntry(
        key="ssd-1b",
        source="segmind/SSD-1B",
        revision="60987f37e94cd59c36b1cba832b9f97b57395a10",  # hub commit: the same weights on every host
        pipeline="StableDiffusionXLPipeline",
        native_size=1024,
        description="Segmind SSD-1B: SDXL distilled",
        vae_source=SDXL_FP16_VAE,
        tiny_vae_source=TAESDXL,
        fast=FastMode(adapter="latent-consistency/lcm-lora-ssd-1b"),
    ),
    ModelEntry(
        key="sdxl-base",
        source="stabilityai/stable-diffusion-xl-base-1.0",
        revision="462165984030d82259a11f4367a4eed129e94a7b",  # hub commit: the same weights on every host
        pipeline="StableDiffusionXLPipeline",
        native_size=1024,
        description="Stable Diffusion XL base 1.0 (teacher of ssd-1b)",
        vae_source=SDXL_FP16_VAE,
        tiny_vae_source=TAESDXL,
        fast=FastMode(adapter="latent-consistency/lcm-lora-sdxl"),
    ),
)


def build_catalog(overrides: dict[str, dict] | None = None) -> dict[str, ModelEntry]:
    """Built-in entries, each updated or added from ``overrides`` (key → fields)."""
    catalog = {entry.key: entry for entry in BUILTIN_MODELS}
    for key, fields in (overrides or {}).items():
        base = catalog[key].model_dump() if key in catalog else {}
        fields = dict(fields)
        if isinstance(fields.get("fast"), dict) and isinstance(base.get("fast"), dict):
            fields["fast"] = {**base["fast"], **fields["fast"]}  # change one field, keep the rest
        if base and fields.get("source", base["source"]) != base["source"]:
            base = {**base, **dict.fromkeys(COMPANIONS)}  # the built-in weights' companions go with them
        catalog[key] = ModelEntry.model_validate({**base, **fields, "key": key})
    return catalog
