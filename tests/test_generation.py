"""Generation through the real loading path (from_pretrained on saved tiny pipelines)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.jobs import JobRequest
from settings.catalog import ModelEntry
from tests.support.stack import ROOT
from worker.generate import generate
from worker.pipelines import ResidentPipelines, load_pipeline

CPU = torch.device("cpu")


def request(**fields) -> JobRequest:
    base = dict(job_id="t", model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=2, guidance=7.5, seed=3, size=64)
    return JobRequest(**{**base, **fields})


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request, tiny_model_dir, tiny_xl_model_dir):
    if request.param == "sd":
        entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline")
    else:
        entry = ModelEntry(key="tiny", source=str(tiny_xl_model_dir), pipeline="StableDiffusionXLPipeline")
    return load_pipeline(entry, CPU, torch.float32)


def pixels(generation) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in generation.images]


def test_images_have_the_requested_size_and_content(pipe):
    generation = generate(pipe, request(size=128, count=2))
    assert [image.size for image in generation.images] == [(128, 128), (128, 128)]
    assert generation.seeds == [3, 4] and generation.inference_ms > 0
    assert all(p.std() > 1 for p in pixels(generation))


def test_same_seed_gives_same_pixels(pipe):
    assert np.array_equal(pixels(generate(pipe, request()))[0], pixels(generate(pipe, request()))[0])
    assert not np.array_equal(pixels(generate(pipe, request()))[0], pixels(generate(pipe, request(seed=4)))[0])


def test_each_image_of_a_batch_reproduces_alone(pipe):
    batch = pixels(generate(pipe, request(seed=10, count=3)))
    for i, image in enumerate(batch):
        alone = pixels(generate(pipe, request(seed=10 + i)))[0]
        assert np.abs(alone - image).max() <= 2  # same noise; batched matmuls may round differently


def test_resident_pipelines_keep_one_instance(tiny_model_dir):
    resident = ResidentPipelines(device=CPU, dtype=torch.float32)
    resident.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline"))
    assert resident.get("tiny") is resident.get("tiny") and resident.keys() == ["tiny"]
    with pytest.raises(LookupError, match="not loaded"):
        resident.get("sdxl-base")


def run_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e  # runs the generate CLI as a process
def test_cli_writes_images(env, tmp_path):
    out = tmp_path / "cat.png"
    done = run_cli(env, "an orange cat", "--seed", "5", "--count", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cat-1.png").exists() and (tmp_path / "cat-2.png").exists()
    assert "seed=6" in done.stdout


@pytest.mark.e2e  # runs the generate CLI as a process
@pytest.mark.parametrize("args, message", [
    (["cat", "--steps", "99"], "error: `steps` must be between 1 and 50 (got 99).\n"),
    (["cat", "--model", "nope"], "error: Unknown model `nope`."),
    (["cat", "--steps", "x"], "error: argument --steps: invalid int value"),
    (["cat", "--out", "noext"], "error: --out noext: use an image file extension"),
    (["cat", "--out", "/dev/null/x.png"], "error: --out /dev/null/x.png: cannot create /dev/null"),
])
def test_cli_bad_input_is_one_line_and_nonzero(env, args, message):
    done = run_cli(env, *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1


@pytest.mark.e2e  # runs the generate CLI as a process
@pytest.mark.parametrize("variable, value, message", [
    ("IMAGINE_MAX_COUNT", "abc", "error: IMAGINE_MAX_COUNT: Input should be a valid integer"),
    ("IMAGINE_MAX_COUNT", "11", "error: IMAGINE_MAX_COUNT: Input should be less than or equal to 10"),
    ("IMAGINE_MODELS", "{bad", "error: error parsing value for field \"models\""),
    ("IMAGINE_DEVICE", "cuda:7", "error: IMAGINE_DEVICE='cuda:7', but this machine's torch sees no such CUDA device"),
])
def test_cli_bad_configuration_is_one_line(env, variable, value, message):
    done = run_cli({**env, variable: value}, "cat", "--size", "64")
    assert done.returncode != 0 and done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.e2e  # runs the generate CLI as a process
def test_cli_missing_weights_is_one_line(env, tmp_path):
    env = {**env, "IMAGINE_MODELS": json.dumps({"tiny": {"source": str(tmp_path / "missing"),
                                                          "pipeline": "StableDiffusionPipeline"}})}
    done = run_cli(env, "cat", "--size", "64")
    assert done.returncode == 1 and done.stderr.startswith("error: cannot load model 'tiny'")
    assert "Traceback" not in done.stderr


def test_local_copy_without_fp16_files_loads_in_half_precision(tiny_model_dir):
    """A catalog entry asks for the fp16 variant on GPU; a local folder saved without it still
    loads (its full-precision files, cast), instead of failing the worker's start."""
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", variant="fp16")
    pipe = load_pipeline(entry, CPU, torch.float16)
    assert pipe.unet.dtype == torch.float16


@pytest.mark.slow  # torch.compile on CPU: minutes
def test_compiled_pipeline_draws_the_same_image(tiny_xl_model_dir):
    """torch.compile (fullgraph, as the worker does at start) with fused QKV and the fused
    scheduler step (its combine compiled too, not fallen back to eager): same pixels."""
    from worker import fused_step
    from worker.optimize import SpeedOptions, optimize

    entry = ModelEntry(key="tiny", source=str(tiny_xl_model_dir), pipeline="StableDiffusionXLPipeline")
    pipe = load_pipeline(entry, CPU, torch.float32)
    eager = pixels(generate(pipe, request(seed=21, count=2)))
    optimize(pipe, SpeedOptions(fuse_qkv=True, compile="default"))
    assert fused_step.wanted(pipe)
    compiled = pixels(generate(pipe, request(seed=21, count=2)))
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(eager, compiled))
    assert fused_step._compiled not in (None, fused_step._combine_eager)
