"""UNet quantization (worker.quantize, torchao) on the tiny pipelines, on CPU: int8 swaps the
UNet's linear weights for torchao tensors and draws nearly the same image; fp8 (no CPU kernel)
and a missing torchao stop the worker with one line; catalog/settings resolution; the fast-mode
LoRA adapter keeps working on quantized base layers; the order fuse → quantize → compile."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from core.jobs import JobRequest
from settings.catalog import FastMode, ModelEntry, build_catalog
from settings.config import Settings
from worker.generate import generate, has_fast_adapter, reproducibility
from worker.optimize import SpeedOptions, optimize
from worker.pipelines import ModelLoadError, ResidentPipelines, weight_bytes
from worker.quantize import (
    QuantizationError,
    _config,
    applied_mode,
    check_mode,
    quantizable,
    quantize_pipeline,
    resolve_mode,
    unsupported_reason,
)
from worker.tiny import tiny_sd, tiny_sdxl

torchao = pytest.importorskip("torchao")

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# Quantized vs unquantized, same seed: measured 51–63 dB on the tiny random pipelines (SD,
# SDXL, fused QKV, standard and fast with the LoRA). For scale: the same seed with another prompt
# gives ~40–42 dB, another seed ~13–15 dB, the fast LoRA on vs off ~20 dB. 45 dB: closer than a
# prompt change, with room for platform rounding.
MIN_PSNR_DB = 45.0


def request(**fields) -> JobRequest:
    base = dict(job_id="q", model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=2, guidance=7.5, seed=7, size=64)
    return JobRequest(**{**base, **fields})


def pixels(pipe, fast: FastMode | None = None, **fields) -> np.ndarray:
    return np.asarray(generate(pipe, request(**fields), fast=fast).images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight).__module__.startswith("torchao")


def unet_linears(pipe) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in pipe.unet.named_modules() if type(m) is torch.nn.Linear}


# -- int8 on the tiny pipelines -------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_sd, tiny_sdxl], ids=["sd", "sdxl"])
def test_int8_swaps_unet_linears_and_draws_nearly_the_same_image(make):
    torch.manual_seed(0)
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    plain = pixels(pipe)
    text_weight = next(pipe.text_encoder.parameters())

    assert quantize_pipeline(pipe, "int8") == "int8" and applied_mode(pipe) == "int8"
    linears = unet_linears(pipe)
    quantized = {name for name, m in linears.items() if is_quantized(m.weight)}
    assert any(".attn1.to_q" in name for name in quantized) and any("ff.net" in name for name in quantized)
    assert quantized == {name for name, m in linears.items() if quantizable(name, m, "int8")}
    assert not any("time_emb" in name or "add_embedding" in name for name in quantized)  # conditioning path
    assert not is_quantized(text_weight) and not any(is_quantized(p) for p in pipe.vae.parameters())
    assert weight_bytes(pipe) > 0  # the memory budget still measures a quantized pipeline

    image = pixels(pipe)
    assert image.shape == plain.shape == (64, 64, 3)
    assert psnr(image, plain) > MIN_PSNR_DB
    weight = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert quantize_pipeline(pipe, "int8") == "int8"  # once: a parked model brought back keeps its weights
    assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight is weight


def test_fused_qkv_is_quantized_after_fusing_and_before_compile(monkeypatch):
    torch.manual_seed(1)
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    plain = pixels(pipe)
    seen = []

    def fake_compile(fn, **_):  # records what torch.compile would trace
        seen.append(is_quantized(pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_qkv.weight))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    optimize(pipe, SpeedOptions(fuse_qkv=True, quantize="int8", compile="default"))
    assert seen == [True, True]  # unet and vae.decode, both after quantizing the fused to_qkv
    assert psnr(pixels(pipe), plain) > MIN_PSNR_DB


def test_reproducibility_says_the_unet_ran_quantized():
    torch.manual_seed(2)
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    entry = ModelEntry(key="tiny", source="tiny", pipeline="StableDiffusionPipeline")
    generation = generate(pipe, request())
    assert "int8" not in reproducibility(entry, pipe, request(), generation).pipeline
    quantize_pipeline(pipe, "int8")
    record = reproducibility(entry, pipe, request(), generate(pipe, request()))
    assert record.pipeline == "StableDiffusionPipeline, UNet int8 (torchao)"
    assert record.png_text(7)["pipeline"] == record.pipeline


# -- the layer rule and fp8 ----------------------------------------------------------------------
def test_layer_rule():
    linear = torch.nn.Linear(32, 48)
    assert quantizable("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", linear, "fp8")
    assert quantizable("mid_block.attentions.0.proj_in", torch.nn.Linear(24, 48), "int8")
    assert not quantizable("mid_block.attentions.0.proj_in", torch.nn.Linear(24, 48), "fp8")  # _scaled_mm: ×16
    for name in ("time_embedding.linear_1", "add_embedding.linear_2", "down_blocks.0.resnets.0.time_emb_proj",
                 "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.fast"):
        assert not quantizable(name, linear, "int8"), name
    assert not quantizable("conv_in", torch.nn.Conv2d(4, 32, 3), "int8")


def test_fp8_is_refused_on_cpu_with_one_line(tiny_model_dir):
    reason = unsupported_reason("fp8", CPU)
    assert "compute capability 8.9" in reason and "\n" not in reason
    with pytest.raises(QuantizationError, match="compute capability 8.9"):
        quantize_pipeline(tiny_sd(), "fp8")
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", quantize="fp8")
    with pytest.raises(ModelLoadError, match=r"^model 'tiny': fp8 quantization needs [^\n]*$"):
        ResidentPipelines(device=CPU, dtype=torch.float32).load(entry)


def test_fp8_support_follows_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "A100 has 8.0" in unsupported_reason("fp8", CUDA)
    assert resolve_mode("catalog", "auto", CUDA) == "none"
    assert unsupported_reason("int8", CUDA) is None
    for capability in ((8, 9), (9, 0)):  # Ada, Hopper
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert unsupported_reason("fp8", CUDA) is None
        assert resolve_mode("catalog", "auto", CUDA) == "fp8"


def test_fp8_config_is_rowwise_for_bf16_and_per_tensor_for_fp16():
    from torchao.quantization import PerRow, PerTensor

    assert all(isinstance(g, PerRow) for g in _config("fp8", torch.bfloat16).granularity)
    assert all(isinstance(g, PerTensor) for g in _config("fp8", torch.float16).granularity)


# -- settings and catalog ------------------------------------------------------------------------
def test_catalog_and_settings_resolution(monkeypatch):
    assert all(entry.quantize == "none" for entry in build_catalog().values())  # until measured
    assert build_catalog({"sd-v1-4": {"quantize": "int8"}})["sd-v1-4"].quantize == "int8"
    assert Settings(_env_file=None).quantize == "catalog"
    monkeypatch.setenv("IMAGINE_QUANTIZE", "int8")
    assert Settings(_env_file=None).quantize == "int8"

    assert resolve_mode("catalog", "auto", CPU) == "none"  # auto: fp8 where supported, else none
    assert resolve_mode("catalog", "int8", CPU) == "int8"
    assert resolve_mode("none", "int8", CPU) == "none"  # the worker-wide setting wins
    assert resolve_mode("int8", "none", CPU) == "int8"
    assert resolve_mode("auto", "int8", CPU) == "none"
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32, quantize="none")
    assert pipelines.quantization(ModelEntry(key="m", source="s", pipeline="StableDiffusionPipeline",
                                             quantize="int8")) == "none"


def test_missing_torchao_is_one_line(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao → ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizationError, match=r"pip install '\.\[worker\]'"):
        check_mode("int8", CPU)
    check_mode("none", CPU)  # not needed when nothing is quantized
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", quantize="int8")
    with pytest.raises(ModelLoadError, match=r"^model 'tiny': quantization needs torchao[^\n]*$"):
        ResidentPipelines(device=CPU, dtype=torch.float32).load(entry)


# -- fast mode's LoRA adapter on quantized base layers -------------------------------------------
def test_fast_adapter_runs_on_quantized_base_layers(tiny_model_dir):
    fast = FastMode(adapter=str(tiny_model_dir / "fast-lora"), steps=2)
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                       native_size=64, variant=None, fast=fast)
    plain = ResidentPipelines(device=CPU, dtype=torch.float32)
    plain.load(entry)
    quantized = ResidentPipelines(device=CPU, dtype=torch.float32, quantize="int8")
    quantized.load(entry)
    pipe = quantized.get("tiny")

    assert applied_mode(pipe) == "int8" and has_fast_adapter(pipe)
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert is_quantized(to_q.base_layer.weight)  # the base layer inside peft's wrapper
    assert not any(is_quantized(p) for name, p in pipe.unet.named_parameters() if "lora_" in name)

    fast_job = dict(quality="fast", steps=2, guidance=1.0, fast=fast)
    standard, fast_image = pixels(pipe), pixels(pipe, **fast_job)
    assert psnr(fast_image, standard) < MIN_PSNR_DB - 10  # the adapter still changes the image
    assert psnr(standard, pixels(plain.get("tiny"))) > MIN_PSNR_DB
    assert psnr(fast_image, pixels(plain.get("tiny"), **fast_job)) > MIN_PSNR_DB


@pytest.mark.slow  # torch.compile on CPU: about a minute
def test_quantized_unet_compiles_fullgraph():
    """int8 + fused QKV + torch.compile(fullgraph), as a compiled worker runs them: same image."""
    torch.manual_seed(3)
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    plain = pixels(pipe)
    optimize(pipe, SpeedOptions(fuse_qkv=True, quantize="int8", compile="default"))
    assert applied_mode(pipe) == "int8"  # seen through the compile wrapper
    assert psnr(pixels(pipe), plain) > MIN_PSNR_DB
