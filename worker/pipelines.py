"""Load diffusers pipelines once and keep them resident across jobs.

With a GPU-memory budget, the models that do not fit wait in host RAM and are moved to the GPU
when a job needs them (SDXL host→GPU ≈ 1 s on an H100, against many seconds from disk), evicting
the least recently used ones.

:func:`resident_pipelines` builds the worker's set from its settings (speed options,
quantization, fast decode, compile cache): the worker and the CLI both start from it.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from settings.catalog import ModelEntry
from worker import compile_cache
from worker.optimize import SpeedOptions, optimize
from worker.quantize import QuantizationError, applied_mode, check_mode, resolve_mode

if TYPE_CHECKING:
    from settings.config import Settings

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CPU = torch.device("cpu")


def resolve_device(setting: str) -> torch.device:
    """The configured device; a ModelLoadError (one line for the user) when it is not there."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as error:
        raise ModelLoadError(f"IMAGINE_DEVICE={setting!r} is not a device: {error}") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"IMAGINE_DEVICE={setting!r}, but this machine's torch sees no such CUDA device")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp16 on GPU, fp32 on CPU (CPU half precision is slow and poorly supported)."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


class ModelLoadError(RuntimeError):
    """Weights missing or unreadable; the message is one line for operators."""


def first_line(error: BaseException) -> str:
    """An error's first line for a one-line message (its class name when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _from_pretrained(entry: ModelEntry, kwargs: dict, use_variant: bool) -> DiffusionPipeline:
    """With the fp16 weight variant (half the download) where the weights have one; a local copy
    saved without it loads its full-precision files, cast to ``dtype``."""
    pipeline_class = getattr(diffusers, entry.pipeline)
    if use_variant:
        try:
            return pipeline_class.from_pretrained(entry.source, variant=entry.variant, **kwargs)
        except ValueError as error:
            if "variant" not in str(error):
                raise
            log.info("%s has no %s weight files; loading the default ones", entry.source, entry.variant)
    return pipeline_class.from_pretrained(entry.source, **kwargs)


def load_pipeline(entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """``from_pretrained`` on a hub id or a local directory, moved to ``device``."""
    kwargs: dict = {"dtype": dtype, "revision": entry.revision}
    if entry.pipeline == "StableDiffusionPipeline":
        # Not the SD 1.x repositories' own checker (it blacks out images silently, and only on
        # SD 1.x): every model's images go through the one output classifier (worker.safety).
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    log.info("loading %s from %s (%s on %s)", entry.key, entry.source, dtype, device)
    try:
        if entry.vae_source:
            kwargs["vae"] = AutoencoderKL.from_pretrained(entry.vae_source, revision=entry.vae_revision, dtype=dtype)
        pipe = _from_pretrained(entry, kwargs, use_variant=dtype == torch.float16 and bool(entry.variant))
    # Missing files, unreachable hub, bad repo id, and also a truncated weights file (safetensors'
    # own error) or weights of another shape (RuntimeError): an operator error, one line.
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model {entry.key!r} from {entry.source}: {first_line(error)}") from error
    pipe.set_progress_bar_config(disable=True)
    load_fast_adapter(pipe, entry)
    return pipe.to(device)


def load_fast_adapter(pipe: DiffusionPipeline, entry: ModelEntry) -> None:
    """Fast mode's step-distillation LoRA (catalog ``fast.adapter``: hub id + revision, or a
    local folder), once, as a peft adapter kept switched off: fast calls switch it on for their
    own duration (worker.generate). Not fused: standard jobs then run the base weights exactly,
    with one copy of them (a fused LoRA would need an unfuse per switch, drifting numerically)."""
    fast = entry.fast
    if fast is None or not fast.adapter:
        return
    from worker.generate import FAST_ADAPTER, set_fast_adapter

    kwargs = {"adapter_name": FAST_ADAPTER, "revision": fast.adapter_revision}
    if fast.adapter_weight_name:
        kwargs["weight_name"] = fast.adapter_weight_name
    log.info("loading fast-mode adapter %s for %s", fast.adapter, entry.key)
    try:
        pipe.load_lora_weights(fast.adapter, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:  # missing files, no peft, shapes that do not fit
        raise ModelLoadError(f"cannot load the fast-mode adapter of {entry.key!r} from {fast.adapter}: "
                             f"{first_line(error)}") from error
    set_fast_adapter(pipe, False)


def weight_bytes(pipe: DiffusionPipeline) -> int:
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@dataclass
class ResidentPipelines:
    """The pipelines a worker serves: loaded once, kept on the device or parked in host RAM."""

    device: torch.device
    dtype: torch.dtype
    speed: SpeedOptions = field(default_factory=SpeedOptions.plain)
    # IMAGINE_QUANTIZE: one mode for every model, or "catalog" (each entry's ``quantize``).
    quantize: str = "catalog"
    budget_bytes: int | None = None  # GPU bytes for weights; None = everything stays on device
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    pipes: dict[str, DiffusionPipeline] = field(default_factory=dict)
    on_device: OrderedDict[str, int] = field(default_factory=OrderedDict)  # key → bytes, LRU first

    optimized: set[str] = field(default_factory=set)
    # Models whose optimization failed part-way, key → the one-line reason (:meth:`_optimize`):
    # their half-optimized pipeline was dropped, and get() answers this error until load() again.
    unusable: dict[str, str] = field(default_factory=dict)
    # Image-to-image pipelines over the resident ones' modules (from_pipe: no second copy of any
    # weight), built on first use; key → (the pipeline it was built over, the img2img pipeline).
    image_pipes: dict[str, tuple[DiffusionPipeline, DiffusionPipeline]] = field(default_factory=dict)
    # The dedicated Upscale ×2 model (worker.upscaler), when configured: loaded once, always on
    # the device (outside the memory budget).
    upscaler: object | None = None
    # Tiny autoencoders (worker.fast_decode), key → AutoencoderTiny, for the models whose catalog
    # entry names one, loaded when previews or fast decode use them (``tiny_vaes_wanted``). Kept
    # on the device, outside the budget and never parked: ~10 MB each, and a preview decoded on
    # the CPU while the model runs on the GPU would take seconds at 1024 px.
    tiny_vaes_wanted: bool = False
    fast_decode: bool = False  # final images decoded by the tiny autoencoder (IMAGINE_FAST_DECODE)
    tiny_vaes: dict[str, torch.nn.Module] = field(default_factory=dict)

    def load(self, entry: ModelEntry) -> None:
        """Load ``entry`` (again: a fresh copy from disk, also after a failed optimization). On
        the device it is optimized at once; a ModelLoadError when that fails (:meth:`_optimize`)."""
        self.quantization(entry)  # a mode this worker cannot run stops it before the weights load
        for held in (self.unusable, self.on_device, self.image_pipes):  # a fresh copy: none of it holds
            held.pop(entry.key, None)
        self.optimized.discard(entry.key)
        parked = self.budget_bytes is not None
        self.pipes[entry.key] = load_pipeline(entry, CPU if parked else self.device, self.dtype)
        self.entries[entry.key] = entry
        if self.tiny_vaes_wanted:
            self._load_tiny_vae(entry)
        if not parked:
            self.on_device[entry.key] = weight_bytes(self.pipes[entry.key])
            self._optimize(entry.key)

    def _load_tiny_vae(self, entry: ModelEntry) -> None:
        """Never fails the worker: previews fall back to the latent projection and fast decode
        to the full VAE, with one log line."""
        from worker.fast_decode import load_tiny_vae

        if not entry.tiny_vae_source:
            log.info("%s has no tiny autoencoder (catalog tiny_vae_source): latent-projection previews, "
                     "full-VAE decode", entry.key)
            return
        try:
            self.tiny_vaes[entry.key] = load_tiny_vae(entry.tiny_vae_source, self.device, self.dtype,
                                                      entry.tiny_vae_revision)
        except Exception as error:  # whatever the folder holds: a preview decoder never stops a worker
            log.warning("%s: %s; latent-projection previews, full-VAE decode", entry.key, first_line(error))

    def final_decoder(self, key: str) -> torch.nn.Module | None:
        """The tiny autoencoder that decodes ``key``'s final images, when fast decode is on."""
        return self.tiny_vaes.get(key) if self.fast_decode else None

    def quantization(self, entry: ModelEntry) -> str:
        """The UNet quantization ``entry`` runs here (worker.quantize); ModelLoadError (one line)
        when the device cannot run it or torchao is missing."""
        mode = resolve_mode(self.quantize, entry.quantize, self.device)
        try:
            check_mode(mode, self.device)
        except QuantizationError as error:
            raise ModelLoadError(f"model {entry.key!r}: {error}") from None
        return mode

    def _optimize(self, key: str) -> None:
        """Once, on the device: compiled graphs and memory layouts belong to the device.

        A failure part-way (a compile or quantization error, out of memory) leaves the pipeline
        half-optimized, and its steps cannot be run again on it: fusing QKV twice loses the
        original attention processors, quantizing a half-quantized UNet quantizes layers twice,
        compiling wraps the compiled UNet. So the pipeline is dropped (its memory freed), the model
        is recorded unusable and a ModelLoadError (one line) raised; get() answers the same error
        without trying again (a deterministic failure would repeat at disk speed for every job)
        until the model is load()ed again, e.g. by a worker restarted with other settings."""
        if key in self.optimized:
            return
        try:
            self._apply_speed(key)
        except Exception as error:  # whatever a step raised: the pipeline is in an unknown state
            reason = (str(error) if isinstance(error, ModelLoadError)
                      else f"model {key!r} could not be optimized ({type(error).__name__}: {first_line(error)})")
            self._drop(key, f"{reason}; not served until loaded again (restart the worker)")
            raise ModelLoadError(self.unusable[key]) from error
        self.optimized.add(key)

    def _apply_speed(self, key: str) -> None:
        entry = self.entries[key]
        speed = SpeedOptions(**{**self.speed.__dict__, "fp16_vae": entry.vae_source is not None})
        if speed.fuse_qkv and entry.fast is not None and entry.fast.adapter:
            # A fused to_qkv is built from the base weights and bypasses the LoRA layers on
            # to_q/to_k/to_v: fast mode would silently lose its adapter there.
            log.info("%s: QKV projections not fused (the fast-mode adapter sits on them)", key)
            speed = SpeedOptions(**{**speed.__dict__, "fuse_qkv": False})
        speed = SpeedOptions(**{**speed.__dict__, "quantize": self.quantization(entry)})
        self.pipes[key] = optimize(self.pipes[key], speed)
        log.info("%s: UNet quantization %s", key, applied_mode(self.pipes[key]))

    def _drop(self, key: str, reason: str) -> None:
        """Forget ``key``'s pipeline (and what was built over it), freeing its memory. Not
        logged here: the ModelLoadError raised says it (the worker's start, the job's failure)."""
        self.unusable[key] = reason
        for held in (self.pipes, self.on_device, self.image_pipes, self.tiny_vaes):
            held.pop(key, None)
        self.optimized.discard(key)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def get(self, key: str) -> DiffusionPipeline:
        if key in self.unusable:
            raise ModelLoadError(self.unusable[key])
        if key not in self.pipes:
            raise LookupError(f"model {key!r} is not loaded on this worker")
        if key in self.on_device:
            self.on_device.move_to_end(key)
        else:
            self._bring_to_device(key)
        return self.pipes[key]

    def get_img2img(self, key: str) -> DiffusionPipeline:
        """The model's image-to-image pipeline (img2img, Vary, Upscale), sharing every module
        with :meth:`get`'s: rebuilt only when that pipeline object changed (e.g. optimized)."""
        from worker.generate import img2img_pipeline

        pipe = self.get(key)
        built = self.image_pipes.get(key)
        if built is None or built[0] is not pipe:
            built = (pipe, img2img_pipeline(pipe))
            self.image_pipes[key] = built
        return built[1]

    def _bring_to_device(self, key: str) -> None:
        size = weight_bytes(self.pipes[key])
        while self.on_device and sum(self.on_device.values()) + size > self.budget_bytes:
            self._park(next(iter(self.on_device)))
        log.info("moving %s to %s (%.1f GiB)", key, self.device, size / 2**30)
        self.pipes[key].to(self.device)
        self.on_device[key] = size
        self._optimize(key)

    def _park(self, key: str) -> None:
        log.info("parking %s in host RAM", key)
        self.pipes[key].to(CPU)
        del self.on_device[key]
        gc.collect()
        torch.cuda.empty_cache()

    def keys(self) -> list[str]:
        return list(self.pipes)

    def resident_keys(self) -> list[str]:
        return list(self.on_device)


def speed_options(settings: Settings) -> SpeedOptions:
    return SpeedOptions(channels_last=settings.channels_last, fuse_qkv=settings.fuse_qkv,
                        compile=settings.compile, fused_step=settings.fused_step,
                        dynamic_batch=settings.compile_dynamic_batch)


def tiny_vaes_wanted(settings: Settings) -> bool:
    """Whether the models' tiny autoencoders are loaded: only for what uses them (a download)."""
    return settings.fast_decode or (settings.progress_preview and settings.progress_preview_decoder == "tiny-vae")


def resident_pipelines(settings: Settings, models: list[str]) -> ResidentPipelines:
    """An empty set configured from ``settings`` as the worker runs (device, dtype, speed options,
    quantization, memory budget, fast decode), for ``models`` to be loaded into; the worker and
    the CLI both build theirs here, so a local run is what a job gets. When compiling, points
    torch.compile's caches at the compile cache directory first (worker.compile_cache).
    ModelLoadError (one line) when the device is not there."""
    if settings.compile != "none" and settings.compile_cache_dir is not None:  # before anything compiles
        compile_cache.use_compile_cache(settings.compile_cache_dir, models, settings.compile)
    device = resolve_device(settings.device)
    budget = settings.gpu_memory_budget_gb
    return ResidentPipelines(device=device, dtype=resolve_dtype(settings.dtype, device),
                             speed=speed_options(settings), quantize=settings.quantize,
                             budget_bytes=None if budget is None else int(budget * 2**30),
                             tiny_vaes_wanted=tiny_vaes_wanted(settings), fast_decode=settings.fast_decode)
