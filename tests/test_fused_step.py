"""The fused scheduler step (worker.fused_step): the same latents as diffusers' own step, for
every scheduler it accepts, at any schedule length and begin index; refused where the step is
not linear; no device→host copy of the pipeline's timestep; in the real pipeline path, the same
images and the same scheduler name in the records."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from core.jobs import JobRequest
from settings.catalog import FastMode, ModelEntry
from worker import fused_step
from worker.generate import generate, mode_for, reproducibility
from worker.optimize import CUDA_GRAPH_MODES, SpeedOptions, optimize
from worker.pipelines import CPU, load_pipeline

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ACCEPTED = [
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),  # SD 1.x's own
    ("PNDMScheduler", {}),  # with the Runge-Kutta warm-up
    ("EulerDiscreteScheduler", dict(steps_offset=1)),  # SDXL's own
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    ("DPMSolverMultistepScheduler", {}),  # bk-sdm-small's fast mode
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DEISMultistepScheduler", {}),
    ("HeunDiscreteScheduler", {}),
]
REFUSED = [
    ("LCMScheduler", {}),  # adds fresh noise every step
    ("EulerAncestralDiscreteScheduler", {}),
    ("DDIMScheduler", {}),  # clip_sample=True by default: a clamp is not linear
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(thresholding=True)),
    ("UniPCMultistepScheduler", {}),  # its corrector's einsum wants latent-shaped tensors
]


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, non-linear stand-in for a UNet."""
    return torch.tanh(0.7 * x + float(t) / 1000.0) + 0.1 * torch.sin(3 * x)


def denoise(scheduler, steps: int, begin: int = 0, return_dict: bool = False) -> tuple[torch.Tensor, list]:
    """The loop of diffusers' pipelines (img2img's when ``begin``): the final latents and every
    step's output."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps[begin * scheduler.order:]
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin * scheduler.order)
    outputs = []
    for t in timesteps:
        eps = fake_model(scheduler.scale_model_input(x, t), t)
        out = scheduler.step(eps, t, x, return_dict=return_dict)
        outputs.append(out)
        x = out[0] if not return_dict else out.prev_sample
    return x, outputs


def scheduler(name: str, config: dict, steps: int, fused: bool):
    made = getattr(diffusers, name)(**SD_BETAS, **config)
    made.set_timesteps(steps)
    if fused:
        assert fused_step.install(made, compiled=False)
    return made


@pytest.mark.parametrize("name,config", ACCEPTED, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("steps,begin", [(25, 0), (4, 0), (5, 0), (20, 8)])
def test_fused_step_gives_diffusers_latents(name, config, steps, begin):
    plain, _ = denoise(scheduler(name, config, steps, False), steps, begin)
    fused, _ = denoise(scheduler(name, config, steps, True), steps, begin)
    scale = plain.abs().max().item()
    assert torch.isfinite(fused).all()
    assert (plain - fused).abs().max().item() <= 2e-5 * max(scale, 1.0)  # float32 rounding


@pytest.mark.parametrize("name,config", [ACCEPTED[2], ACCEPTED[4]], ids=["euler", "ddim"])
def test_every_output_field_is_the_real_tensor(name, config):
    """return_dict=True (the output object) and pred_original_sample, not only prev_sample."""
    _, plain = denoise(scheduler(name, config, 6, False), 6, return_dict=True)
    _, fused = denoise(scheduler(name, config, 6, True), 6, return_dict=True)
    for a, b in zip(plain, fused):
        assert type(a) is type(b) and list(a.keys()) == list(b.keys())
        for key in a.keys():
            assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.mark.parametrize("name,config", REFUSED, ids=lambda v: v if isinstance(v, str) else str(v))
def test_a_step_that_is_not_linear_keeps_its_own(name, config):
    made = getattr(diffusers, name)(**SD_BETAS, **config)
    assert not fused_step.install(made)
    assert made.step.__func__ is type(made).step  # untouched


def test_eta_noise_falls_back_to_the_plain_step():
    """DDIM with eta > 0 (a caller's kwarg, not the config) injects noise: the plain step runs."""
    made = scheduler("DDIMScheduler", dict(clip_sample=False), 5, True)
    seen = []
    plain = made.step.plain_step
    made.step.plain_step = lambda *args, **kwargs: seen.append(args[0]) or plain(*args, **kwargs)
    x = torch.randn(1, 4, 8, 8)
    made.step(fake_model(x, made.timesteps[0]), made.timesteps[0], x, eta=0.5,
              generator=torch.Generator().manual_seed(1))
    assert seen and seen[0].shape == x.shape  # the real tensor went in, not a probe


def test_the_pipeline_timestep_is_never_read_back():
    """The probe step gets the schedule's host copy of each timestep, found by its place in
    ``scheduler.timesteps`` (on a GPU, reading the pipeline's own CUDA timestep waits for the
    step's UNet)."""
    made = scheduler("PNDMScheduler", dict(skip_prk_steps=True), 10, True)
    received = []
    plain = made.step.plain_step

    def spy(output, timestep, sample, *args, **kwargs):
        received.append(timestep)
        return plain(output, timestep, sample, *args, **kwargs)

    made.step.plain_step = spy
    denoise(made, 10, begin=3)
    own = made.timesteps.untyped_storage().data_ptr()
    assert len(received) == len(made.timesteps) - 3
    assert all(t.untyped_storage().data_ptr() != own for t in received)
    assert [int(t) for t in received] == [int(t) for t in made.timesteps[3:]]


def test_more_steps_than_scheduled_is_an_error_not_a_guess():
    made = scheduler("EulerDiscreteScheduler", {}, 2, True)
    x = torch.randn(1, 4, 8, 8)
    for t in made.timesteps:
        x = made.step(fake_model(x, t), t, x, return_dict=False)[0]
    with pytest.raises((RuntimeError, IndexError)):
        for _ in range(3):
            made.step(fake_model(x, 1), made.timesteps[-1], x)


def test_compiled_combine_matches_the_eager_sum():
    """The inductor kernel (CPU backend here) adds the same weighted tensors."""
    tensors = [torch.randn(2, 4, 16, 16, dtype=torch.float16) for _ in range(3)]
    weights = torch.tensor([[0.5, -1.25, 2.0], [1.0, 0.0, -0.5]])
    eager = fused_step._combine(weights, tensors, torch.float16, compiled=False)
    compiled = fused_step._combine(weights, tensors, torch.float16, compiled=True)
    for a, b in zip(eager, compiled):
        assert b.dtype == torch.float16 and torch.allclose(a.float(), b.float(), atol=1e-3)


def test_a_compile_failure_falls_back_to_the_eager_sum_for_good(monkeypatch, caplog):
    """A faster step never fails a job: the same sums, one log line, no retry of the compile."""
    def broken(*args):
        raise RuntimeError("inductor: no C++ compiler\nlong traceback")

    monkeypatch.setattr(fused_step, "_compiled", broken)
    tensors = [torch.randn(1, 4, 8, 8) for _ in range(2)]
    weights = torch.tensor([[0.5, 2.0], [1.0, 0.0], [0.0, 1.0]])
    with caplog.at_level("WARNING", logger="worker.fused_step"):
        out = fused_step._combine(weights, tensors, torch.float32, compiled=True)
    assert torch.allclose(out[0], 0.5 * tensors[0] + 2.0 * tensors[1]) and torch.equal(out[2], tensors[1])
    assert fused_step._compiled is fused_step._combine_eager
    assert [r.getMessage() for r in caplog.records] == [
        "fused scheduler step: compiled combine failed (inductor: no C++ compiler); using the eager sum"]


def test_out_of_memory_in_the_combine_is_the_callers(monkeypatch):
    """generate halves the batch on out-of-memory; the combine must not swallow it, nor stop
    compiling because of it."""
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fused_step, "_compiled", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused_step._combine(torch.ones(3, 1), [torch.ones(2, 2)], torch.float32, compiled=True)
    assert fused_step._compiled is out_of_memory


# -- in the pipeline path ---------------------------------------------------------------------

def request(**fields) -> JobRequest:
    base = dict(job_id="t", model="tiny", prompt="an orange cat", negative_prompt="blurry",
                steps=4, guidance=7.5, seed=3, size=64)
    return JobRequest(**{**base, **fields})


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def entry_and_pipe(request, tiny_model_dir, tiny_xl_model_dir):
    xl = request.param == "sdxl"
    entry = ModelEntry(key="tiny", source=str(tiny_xl_model_dir if xl else tiny_model_dir),
                       pipeline="StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    return entry, load_pipeline(entry, CPU, torch.float32)


@pytest.mark.parametrize("scheduler_name", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_marked_pipeline_draws_the_same_images_and_records_the_same_scheduler(entry_and_pipe, scheduler_name,
                                                                              monkeypatch):
    entry, pipe = entry_and_pipe
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    monkeypatch.setattr(fused_step, "_compiled", fused_step._combine_eager)  # compile: the slow test's
    plain = generate(pipe, request(count=2))
    fused_step.mark(pipe.unet)
    try:
        assert isinstance(mode_for(pipe, request(), None).scheduler.step, fused_step.LinearStep)
        fused = generate(pipe, request(count=2))
    finally:
        delattr(pipe.unet, fused_step.MARKER)
    for a, b in zip(plain.images, fused.images):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert fused.scheduler == plain.scheduler == scheduler_name
    assert reproducibility(entry, pipe, request(count=2), fused).scheduler == scheduler_name


def test_fast_mode_solver_is_fused_and_lcm_is_not(entry_and_pipe):
    _, pipe = entry_and_pipe
    fused_step.mark(pipe.unet)
    try:
        dpm = mode_for(pipe, request(quality="fast"), FastMode(scheduler="DPMSolverMultistepScheduler", steps=12,
                                                                guidance=None, max_guidance=None))
        assert isinstance(dpm.scheduler.step, fused_step.LinearStep)
        lcm = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        assert not fused_step.install(lcm)
    finally:
        delattr(pipe.unet, fused_step.MARKER)


def test_unmarked_pipeline_keeps_diffusers_step(entry_and_pipe):
    _, pipe = entry_and_pipe
    made = mode_for(pipe, request(), None).scheduler
    assert made.step.__func__ is type(made).step


# -- CUDA graphs: the UNet's output is overwritten by the next step's replay --------------------

class MarkedPipe:
    """What fused_step.prepare reads of a pipeline: its UNet's markers."""

    def __init__(self, fused: bool, cuda_graphs: bool) -> None:
        self.unet = torch.nn.Module()
        fused_step.mark(self.unet, fused=fused, cuda_graphs=cuda_graphs)


def denoise_into_static_buffer(scheduler, steps: int) -> torch.Tensor:
    """As a CUDA-graph UNet without classifier-free guidance: every step's model output is the
    same static buffer, rewritten in place by the next step."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    static = torch.empty_like(x)
    for t in scheduler.timesteps:
        static.copy_(fake_model(scheduler.scale_model_input(x, t), t))
        x = scheduler.step(static, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "diffusers-step-on-a-copy"])
def test_history_survives_an_overwritten_model_output(fused):
    """PNDM keeps its last four model outputs; they must not be the overwritten graph output."""
    config = dict(skip_prk_steps=True, steps_offset=1)
    reference, _ = denoise(scheduler("PNDMScheduler", config, 10, False), 10)
    unprotected = denoise_into_static_buffer(scheduler("PNDMScheduler", config, 10, False), 10)
    assert (unprotected - reference).abs().max() > 1e-2  # the hazard is real: history aliased

    made = getattr(diffusers, "PNDMScheduler")(**SD_BETAS, **config)
    made.set_timesteps(10)
    fused_step.prepare(made, MarkedPipe(fused=fused, cuda_graphs=True))
    assert isinstance(made.step, fused_step.LinearStep) == fused
    if fused:
        made.step.compiled = False
    protected = denoise_into_static_buffer(made, 10)
    assert (protected - reference).abs().max() <= 2e-5 * reference.abs().max()


def test_without_cuda_graphs_the_plain_step_is_untouched():
    made = diffusers.PNDMScheduler(**SD_BETAS)
    fused_step.prepare(made, MarkedPipe(fused=False, cuda_graphs=False))
    assert made.step.__func__ is diffusers.PNDMScheduler.step


def test_compiled_modes_with_cuda_graphs_mark_the_unet(tiny_model_dir):
    """worker.optimize marks reduce-overhead and max-autotune (CUDA graphs), not default."""
    assert set(CUDA_GRAPH_MODES) == {"reduce-overhead", "max-autotune"}
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline")
    for mode, graphs in (("reduce-overhead", True), ("default", False)):
        pipe = load_pipeline(entry, CPU, torch.float32)
        optimize(pipe, SpeedOptions(fuse_qkv=False, compile=mode, fused_step=False))  # compiles lazily
        assert fused_step._marked(pipe, fused_step.CUDA_GRAPHS_MARKER) == graphs
        assert not fused_step.wanted(pipe)


@pytest.mark.slow  # compiles the combine for every count of tensors on CPU
def test_warm_up_compiles_every_combine_a_long_job_needs(tiny_model_dir, monkeypatch):
    """The worker's warm-up runs 2-step calls; fused_step.warm_up compiles the rest, so a
    25-step PNDM job compiles nothing in front of its user."""
    from torch._dynamo.utils import counters

    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline")
    pipe = load_pipeline(entry, CPU, torch.float32)
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
    monkeypatch.setattr(fused_step, "_compiled", None)
    monkeypatch.setattr(fused_step, "_warmed", set())
    fused_step.mark(pipe.unet)
    try:
        fused_step.warm_up(pipe)
        compiled = counters["stats"]["unique_graphs"]
        generation = generate(pipe, request(steps=25))
        assert counters["stats"]["unique_graphs"] == compiled
        assert fused_step._compiled not in (None, fused_step._combine_eager)
        assert generation.images[0].size == (64, 64)
    finally:
        delattr(pipe.unet, fused_step.MARKER)


def test_warm_up_skips_pipelines_without_the_fused_step(entry_and_pipe, monkeypatch):
    _, pipe = entry_and_pipe
    monkeypatch.setattr(fused_step, "_compiled", None)
    fused_step.warm_up(pipe)
    assert fused_step._compiled is None


@pytest.mark.parametrize("mode,fields", [
    ("img2img", dict(strength=0.55, steps=9)),  # begins mid-schedule (set_begin_index)
    ("upscale", dict(strength=0.3, steps=10, width=128, height=128)),  # tiles: a fresh scheduler each
    ("txt2img", dict(guidance=1.0, count=3)),  # no CFG: the model output is the UNet's own
])
def test_image_modes_draw_the_same_images_with_the_fused_step(entry_and_pipe, mode, fields, monkeypatch):
    """img2img, Vary and Upscale run the same UNet (from_pipe) and so get the fused step too:
    their images stay diffusers' own."""
    from PIL import Image

    from core.jobs import SourceImage
    from worker.generate import Sources, img2img_pipeline
    from worker.source_image import SourceInput, fit

    _, pipe = entry_and_pipe
    sources = None
    if mode == "txt2img":
        job = request(**fields)
    else:
        job = request(mode=mode, source=SourceImage(url="https://cdn.discordapp.com/attachments/1/2/a.png"),
                      **fields)
        picture = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        sources = Sources({job.job_id: SourceInput(fit(picture, job.width, job.height), "f" * 64, picture.size)},
                          64)
        pipe = img2img_pipeline(pipe)
    monkeypatch.setattr(fused_step, "_compiled", fused_step._combine_eager)
    installed = []
    monkeypatch.setattr(fused_step, "install", lambda s, compiled=True, _real=fused_step.install:
                        installed.append(_real(s, compiled)) or installed[-1])
    plain = generate(pipe, job, sources=sources)
    fused_step.mark(pipe.unet)
    try:
        fused = generate(pipe, job, sources=sources)
    finally:
        delattr(pipe.unet, fused_step.MARKER)
    assert installed and all(installed)  # every pipeline call of the job ran the fused step
    assert fused.images[0].size == (job.width, job.height) and len(fused.images) == job.count
    for a, b in zip(plain.images, fused.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
