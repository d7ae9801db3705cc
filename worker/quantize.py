"""Low-precision UNet weights and activations (torchao): float8 on GPUs with fp8 tensor cores
(Ada, Hopper: compute capability 8.9+), int8 on any CUDA GPU or CPU.

Only the UNet's ``nn.Linear`` layers are quantized (dynamic: activations are scaled per call):
the UNet runs every step, so it is nearly all of a job's time. The text encoders run once per
job and the VAE once per image: little time to win, and the VAE decides the pixels directly.

Which linears (:func:`quantizable`):
- not the conditioning path (``time_embedding``, ``add_embedding``, each resnet's
  ``time_emb_proj``): their matmuls have one row per image, so quantizing the activations costs
  more than the matmul saves, and an error there shifts every pixel of the image;
- not peft's LoRA matrices (``lora_A``/``lora_B``: rank-sized, a rounding error there is the
  whole adapter); the base ``nn.Linear`` a LoRA layer wraps is quantized, and the adapter still
  adds its own full-precision output on top, so fast mode keeps working;
- fp8 only: both dimensions multiples of 16 (``torch._scaled_mm``'s requirement; torchao would
  otherwise skip the layer silently).

Order (worker.optimize): after fusing QKV (the fused weight is built from plain tensors), before
torch.compile (which then traces the quantized kernels).
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch
from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

Quantization = Literal["none", "fp8", "int8"]
MODES: tuple[str, ...] = get_args(Quantization)
EXTRA = "worker"  # the pyproject extra that installs torchao
FP8_CAPABILITY = (8, 9)  # Ada Lovelace; Hopper is 9.0
# Module names on the per-image conditioning path (UNet2DConditionModel).
CONDITIONING = ("time_embedding", "add_embedding", "time_emb_proj")
MARKER = "_imagine_quantization"  # set on the UNet: what reproducibility records report


class QuantizationError(RuntimeError):
    """A mode this worker cannot apply; the message is one line for operators."""


def unsupported_reason(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device``; None when it can."""
    if mode not in MODES:
        return f"unknown quantization {mode!r} (one of {', '.join(MODES)})"
    if mode == "fp8":
        if device.type != "cuda":
            return f"fp8 quantization needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper); device is {device}"
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            return (f"fp8 quantization needs compute capability 8.9+ (Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    if mode == "int8" and device.type not in ("cuda", "cpu"):
        return f"int8 quantization runs on CUDA or CPU, not {device}"
    return None


def supported(mode: str, device: torch.device) -> bool:
    return unsupported_reason(mode, device) is None


def check_mode(mode: str, device: torch.device) -> None:
    """A QuantizationError (one line) when ``mode`` cannot run here: at worker start, before
    minutes of loading, rather than at the model's first job."""
    if mode == "none":
        return
    reason = unsupported_reason(mode, device)
    if reason is not None:
        raise QuantizationError(reason)
    _torchao()


def resolve_mode(override: str, catalog: str, device: torch.device) -> str:
    """The mode one model runs: the worker-wide setting unless "catalog", then the model's own;
    "auto" is fp8 where the device supports it, else none."""
    mode = catalog if override == "catalog" else override
    if mode == "auto":
        return "fp8" if supported("fp8", device) else "none"
    return mode


def quantizable(name: str, module: torch.nn.Module, mode: str) -> bool:
    """The layer rule (module docstring); ``name`` is the module's path inside the UNet."""
    if type(module) is not torch.nn.Linear:  # exact: a LoRA wrapper is not one, its base layer is
        return False
    parts = name.split(".")
    if any(part in CONDITIONING for part in parts) or "lora_A" in parts or "lora_B" in parts:
        return False
    return mode != "fp8" or (module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError as error:
        raise QuantizationError(f"quantization needs torchao, which is not installed "
                                f"(pip install '.[{EXTRA}]'): {error}") from None
    return quantization


def _config(mode: str, weight_dtype: torch.dtype):
    quantization = _torchao()
    if mode == "int8":
        return quantization.Int8DynamicActivationInt8WeightConfig()  # per-token act., per-channel weights
    # Row-wise scales are torchao's recommended fp8 recipe on Hopper, but torchao takes them only
    # for bfloat16 weights; an fp16 UNet (the worker's GPU default) gets one scale per tensor.
    granularity = quantization.PerRow() if weight_dtype == torch.bfloat16 else quantization.PerTensor()
    return quantization.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)


def quantize_pipeline(pipe: DiffusionPipeline, mode: str) -> str:
    """Quantize ``pipe``'s UNet linears in place (:func:`quantizable`); returns the mode applied.
    Raises QuantizationError (one line) when the mode cannot run on the pipeline's device."""
    if mode == "none":
        return "none"
    check_mode(mode, pipe.device)
    unet = pipe.unet
    if getattr(unet, MARKER, "none") != "none":
        return getattr(unet, MARKER)  # once: a parked model brought back is already quantized
    chosen = [name for name, module in unet.named_modules() if quantizable(name, module, mode)]
    if not chosen:
        log.warning("%s quantization: no UNet linear layer qualifies; nothing quantized", mode)
        return "none"
    _torchao().quantize_(unet, _config(mode, unet.dtype),
                         filter_fn=lambda module, name: quantizable(name, module, mode))
    setattr(unet, MARKER, mode)
    log.debug("%s quantization: %d UNet linear layers", mode, len(chosen))
    return mode


def applied_mode(pipe: DiffusionPipeline) -> str:
    """The quantization ``pipe``'s UNet runs with ("none" when plain); through compile wrappers."""
    unet = getattr(pipe, "unet", None)  # None: a pipeline without one (test doubles)
    return getattr(getattr(unet, "_orig_mod", unet), MARKER, "none")
