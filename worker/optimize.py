"""Make a loaded pipeline fast on GPU: channels-last, fused QKV projections, an fp16-safe VAE,
optional UNet quantization (worker.quantize), optional torch.compile (with the fused scheduler
step of worker.fused_step). SDPA attention is
diffusers' default processor on torch 2.

Each step is a no-op where it does not apply (CPU, fp32), so the same code runs in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from worker import fused_step
from worker.quantize import quantize_pipeline

log = logging.getLogger(__name__)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: str = "none"  # "none" | "default" | "reduce-overhead" (CUDA graphs) | "max-autotune"
    fp16_vae: bool = False  # the VAE is known to be fp16-safe (fp16-fix weights)
    quantize: str = "none"  # worker.quantize.Quantization: "none" | "fp8" | "int8" (the UNet's linears)
    # With a compiled UNet: the scheduler step as one compiled kernel, without the per-step wait
    # for the GPU that PNDM's step makes (worker.fused_step).
    fused_step: bool = True
    # With compile: the UNet's batch dimension symbolic from its first call (:func:`batch_dynamic`).
    dynamic_batch: bool = True

    @classmethod
    def plain(cls) -> "SpeedOptions":
        return cls(channels_last=False, fuse_qkv=False, compile="none")


def optimize(pipe: DiffusionPipeline, options: SpeedOptions) -> DiffusionPipeline:
    on_gpu = pipe.device.type == "cuda"
    if options.channels_last and on_gpu:
        # Convolutions in NHWC use the tensor cores without layout transposes.
        pipe.unet.to(memory_format=torch.channels_last)
        if options.compile != "none":
            # Not for an eager VAE: its decode took 143 ms instead of 86 at 1024² (28 vs 21 ms
            # at 512²) on an H200 (docs/benchmarks.md, round two).
            pipe.vae.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        # One matmul for Q, K and V instead of three: fewer kernel launches per attention.
        pipe.fuse_qkv_projections()
    if options.fp16_vae and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.register_to_config(force_upcast=False)  # decode in fp16, skip the fp32 round trip
    if options.quantize != "none":
        # After fusing (to_qkv is built from plain weights), before compiling (traces the
        # quantized matmuls).
        quantize_pipeline(pipe, options.quantize)
    if options.compile != "none":  # also on CPU (inductor's C++ backend), where tests check it
        mode = None if options.compile == "default" else options.compile
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
        if options.dynamic_batch:
            pipe.unet.register_forward_pre_hook(batch_dynamic, with_kwargs=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
        log.info("compiled unet and vae decode (mode=%s); warm-up compiles each shape", options.compile)
        fused_step.mark(pipe.unet, fused=options.fused_step, cuda_graphs=options.compile in CUDA_GRAPH_MODES)
    return pipe


def batch_dynamic(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Before each call of the compiled UNet: its inputs' batch dimension (latents, prompt
    embeddings, SDXL's added conditions) marked dynamic, so the first warm-up call compiles the
    graph every batch size runs. Without it, torch compiles a graph specialised to the first
    batch size, then, at the second, one with the batch dynamic: a second trace and compile
    at every start, cached or not (bench.cold_start, docs/benchmarks.md). ``maybe_``: a batch of
    one (no classifier-free guidance) stays specialised, as torch always keeps size-1
    dimensions. CUDA graphs are still recorded per batch size."""
    conditions = kwargs.get("added_cond_kwargs") or {}
    for value in (*args, *kwargs.values(), *conditions.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(value, 0)
