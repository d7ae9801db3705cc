"""The generate CLI (worker.cli) builds its pipeline as the worker does, from the same settings
(worker.pipelines.resident_pipelines): fast decode, quantization and their one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from worker.cli import main


@pytest.fixture
def cli(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model with its tiny autoencoder, as the only IMAGINE_* settings; run in tmp_path."""
    for name in [name for name in os.environ if name.startswith("IMAGINE_")]:
        monkeypatch.delenv(name)
    models = {"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
                       "variant": None, "tiny_vae_source": str(tiny_model_dir / "tiny-vae")}}
    monkeypatch.setenv("IMAGINE_MODELS", json.dumps(models))
    monkeypatch.setenv("IMAGINE_MIN_SIZE", "64")
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)

    def run(out: str, **env: str) -> int:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return main(["an orange cat", "--model", "tiny", "--steps", "2", "--seed", "4", "--size", "64",
                     "--out", str(tmp_path / out)])
    return run


def test_fast_decode_decodes_the_cli_images_with_the_tiny_autoencoder(cli, tmp_path, capsys):
    assert cli("fast.png", IMAGINE_FAST_DECODE="1") == 0
    said = capsys.readouterr().out
    fast = Image.open(tmp_path / "fast.png")
    assert fast.size == (64, 64) and fast.text["seed"] == "4"
    # The PNG's generation record and the printed summary name the decoder, as ℹ Info would.
    assert fast.text["pipeline"].startswith("StableDiffusionPipeline, decoded by AutoencoderTiny ")
    assert f"pipeline: {fast.text['pipeline']}\n" in said
    assert cli("full.png", IMAGINE_FAST_DECODE="0") == 0
    full = Image.open(tmp_path / "full.png")
    assert full.text["pipeline"] == "StableDiffusionPipeline" and "decoded by" not in capsys.readouterr().out
    assert not np.array_equal(np.asarray(fast), np.asarray(full))  # another decoder, other pixels


def test_fp8_quantization_without_a_gpu_is_one_line_and_nonzero(cli, tmp_path, capsys):
    assert cli("cat.png", IMAGINE_QUANTIZE="fp8") == 1
    error = capsys.readouterr().err
    assert error.startswith("error: model 'tiny': fp8 quantization needs a CUDA GPU"), error
    assert error.count("\n") == 1 and not (tmp_path / "cat.png").exists()


def test_the_cli_runs_the_quantization_the_worker_would(cli, tmp_path, capsys):
    assert cli("int8.png", IMAGINE_QUANTIZE="int8") == 0
    assert Image.open(tmp_path / "int8.png").text["pipeline"] == "StableDiffusionPipeline, UNet int8 (torchao)"
    assert "pipeline: StableDiffusionPipeline, UNet int8 (torchao)\n" in capsys.readouterr().out


@pytest.mark.parametrize("spelling,expected", [("true", True), ("1", True), ("false", False), ("0", False),
                                               ("off", False), ("no", False)])
def test_compile_switches_reach_the_speed_options_the_worker_and_cli_build(monkeypatch, spelling, expected):
    """IMAGINE_COMPILE_DYNAMIC_BATCH and IMAGINE_FUSED_STEP, in the spellings an operator writes,
    end up in worker.pipelines.speed_options (the worker's and the CLI's one builder)."""
    from settings.config import Settings
    from worker.pipelines import speed_options

    monkeypatch.setenv("IMAGINE_COMPILE_DYNAMIC_BATCH", spelling)
    monkeypatch.setenv("IMAGINE_FUSED_STEP", spelling)
    options = speed_options(Settings(_env_file=None, compile="reduce-overhead"))
    assert (options.dynamic_batch, options.fused_step, options.compile) == (expected, expected, "reduce-overhead")
