"""The scheduler step in two kernels (a stack, one compiled sum), without waiting for the GPU.

The profile of a compiled bk-sdm-small call (docs/benchmarks.md, round two) showed the GPU idle
~40 % of the time between CUDA-graph replays, and PNDM's step taking about as long on the CPU as
a step's kernels on the GPU. PNDM indexes its CPU tables with the pipeline's CUDA timestep and
branches on it: device→host reads, so the CPU waits for each step's UNet before it can queue the
next one, and the GPU then waits for the CPU. Its arithmetic is also ~15 tiny kernels per step.

The step of the deterministic schedulers is *linear*: the next latents are a weighted sum of the
current latents, the model output and a few earlier ones, with weights that depend only on the
schedule. So this module runs the scheduler's own ``step`` on *coefficient vectors* on the CPU
instead of latents (each basis vector stands for one real tensor: "the latents entering step
i", "the model output of step i"), with the timestep read from a host copy of the schedule; what
comes out is the weights, exact, with every branch, counter and history list of the scheduler
evolving as it would. The real latents are then combined with those weights by one function
compiled with torch.compile (after one stacking copy): two kernels per step instead of ~15, and
nothing that waits for the GPU.

Nothing of diffusers is rewritten, so any timestep schedule, begin index (img2img) or solver
order works the same; only schedulers whose step is linear are accepted (:func:`supports`):
stochastic ones (LCM, ancestral, SDE solvers, DDIM with eta > 0) and clipping or thresholding
configurations keep their plain step.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

MARKER = "_imagine_fused_step"  # set on the UNet (inside compile wrappers) by worker.optimize
CUDA_GRAPHS_MARKER = "_imagine_cuda_graphs"  # the same, when the compiled UNet replays CUDA graphs
HISTORY_STEPS = 16  # real tensors kept: PLMS after Runge-Kutta warm-up reads 13 calls back
PROBE_DTYPE = torch.float64  # the weights; schedulers that upcast to float32 keep ~1e-7 of them
# Outputs per combine: prev_sample, pred_original_sample where the scheduler returns it, and a
# copy of the model output for the later steps that read it (see LinearStep._realise).
ROWS = 3

# Deterministic schedulers whose step is linear in its tensors (for the configurations below).
LINEAR_SCHEDULERS = ("PNDMScheduler", "EulerDiscreteScheduler", "DDIMScheduler",
                     "DPMSolverMultistepScheduler", "DEISMultistepScheduler",
                     "HeunDiscreteScheduler")


def supports(scheduler: object) -> bool:
    """Whether ``scheduler``'s step is a fixed linear map of its tensors: a known deterministic
    class, no clipping or thresholding, no noise-injecting variant."""
    config = getattr(scheduler, "config", {})
    if type(scheduler).__name__ not in LINEAR_SCHEDULERS:
        return False
    if config.get("thresholding", False) or config.get("clip_sample", False):
        return False
    if "sde" in str(config.get("algorithm_type", "")):
        return False
    if config.get("use_flow_sigmas", False) or config.get("prediction_type") == "flow_prediction":
        return False
    return True


def mark(unet: torch.nn.Module, fused: bool = True, cuda_graphs: bool = False) -> None:
    """What the scheduler step of every call of the pipelines sharing this compiled UNet gets
    (:func:`prepare`): the fused step (``fused``), and whether the UNet's outputs live in CUDA
    graph memory that the next step overwrites (``cuda_graphs``)."""
    module = getattr(unet, "_orig_mod", unet)
    if fused:
        setattr(module, MARKER, True)
    if cuda_graphs:
        setattr(module, CUDA_GRAPHS_MARKER, True)


def _marked(pipe: object, marker: str) -> bool:
    unet = getattr(pipe, "unet", None)
    return bool(getattr(getattr(unet, "_orig_mod", unet), marker, False))


def wanted(pipe: object) -> bool:
    return _marked(pipe, MARKER)


def prepare(scheduler: object, pipe: object) -> None:
    """Set up a fresh scheduler for one call of ``pipe``: the fused step where the pipeline asks
    for it and the step is linear; otherwise, under CUDA graphs, diffusers' step on a copy of
    the model output (PNDM keeps the last four in its history, and without classifier-free
    guidance the model output *is* the graph's output, overwritten by the next step's replay:
    reading it then fails the job)."""
    if wanted(pipe) and install(scheduler):
        return
    if _marked(pipe, CUDA_GRAPHS_MARKER):
        scheduler.step = functools.partial(_step_on_a_copy, scheduler.step)


def _step_on_a_copy(step: Callable, model_output: torch.Tensor, *args, **kwargs):
    return step(model_output.clone(), *args, **kwargs)


def _combine_eager(weights: torch.Tensor, stacked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row r of the result: row r of ``weights`` (outputs × tensors) applied to ``stacked``
    (tensors × elements), summed in float32."""
    return (weights[:, :, None] * stacked[None].float()).sum(1).to(dtype)


_compiled: Callable | None = None


def _combine(weights: torch.Tensor, tensors: Sequence[torch.Tensor], dtype: torch.dtype,
             compiled: bool) -> list[torch.Tensor]:
    """The weighted sums, one per row of ``weights``, shaped like the tensors. The tensors are
    stacked flat first (one copy kernel), so that one compiled graph, every size dynamic from
    the start, serves every count of tensors, shape and scheduler: a graph per count would add
    a compile per count to every worker start, even from the cache. Inductor's default mode:
    CUDA graphs would first copy the inputs into their static buffers. Eager, with one log line,
    from then on if compiling fails."""
    global _compiled
    shape = tensors[0].shape
    stacked = torch.stack([t.reshape(-1) for t in tensors])
    if not compiled:
        return list(_combine_eager(weights, stacked, dtype).view(-1, *shape))
    if _compiled is None:
        _compiled = torch.compile(_combine_eager, fullgraph=True, dynamic=True)
    try:
        return list(_compiled(weights, stacked, dtype).view(-1, *shape))
    except torch.cuda.OutOfMemoryError:
        raise  # the caller's to handle (generate halves the batch); not a reason to stop compiling
    except Exception as error:  # a faster step must never fail a job: the eager sum is the same
        log.warning("fused scheduler step: compiled combine failed (%s); using the eager sum",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        _compiled = _combine_eager
        return list(_combine_eager(weights, stacked, dtype).view(-1, *shape))


_warmed: set[tuple[torch.device, torch.dtype]] = set()


def warm_up(pipe: object) -> None:
    """Compile the combine now, at worker start, for pipelines that use the fused step, so that
    no job compiles it in front of a user (one graph serves every count of tensors and shape)."""
    unet = getattr(pipe, "unet", None)
    if not wanted(pipe) or unet is None:
        return
    device, dtype = unet.device, unet.dtype
    if (device, dtype) in _warmed:
        return
    with torch.inference_mode():  # as pipeline calls run (grad mode is part of dynamo's guards)
        tensors = [torch.zeros(2, 4, 8, 8, device=device, dtype=dtype) for _ in range(2)]
        _combine(torch.zeros(ROWS, 2, device=device), tensors, dtype, compiled=True)
    _warmed.add((device, dtype))


class LinearStep:
    """A scheduler's ``step`` replaced by probe + one combine (see the module docstring). Install
    with :func:`install`; the scheduler is then used exactly as before, by the same pipeline."""

    def __init__(self, scheduler: object, compiled: bool = True) -> None:
        self.scheduler = scheduler
        self.plain_step = scheduler.step  # the class's bound method, run on the probes
        self.compiled = compiled
        self.calls = 0
        self.tensors: OrderedDict[int, torch.Tensor] = OrderedDict()  # basis index → real tensor
        self.size = 0
        self.host_timesteps: torch.Tensor | None = None

    def _host_timestep(self, timestep):
        """``timestep`` on the CPU without waiting for the GPU. PNDM indexes its CPU tables with
        the timestep: with the pipeline's CUDA timestep that is a device→host copy, so the CPU
        waits for every step's UNet before it can queue the next one. The pipeline's timestep is
        a view into ``scheduler.timesteps``, so its position in that tensor names it."""
        if not isinstance(timestep, torch.Tensor):
            return timestep
        timesteps = self.scheduler.timesteps
        if self.host_timesteps is None:
            self.host_timesteps = timesteps.to("cpu", copy=True)  # once per call
        if (timestep.dim() == 0 and timesteps.dim() == 1 and timesteps.stride(0) == 1
                and timestep.device == timesteps.device
                and timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()):
            position = timestep.storage_offset() - timesteps.storage_offset()
            if 0 <= position < len(timesteps):
                return self.host_timesteps[position]
        return timestep.cpu()  # not one of the schedule's own: the copy the plain step makes

    def _probe(self, index: int) -> torch.Tensor:
        vector = torch.zeros(self.size, dtype=PROBE_DTYPE)
        vector[index] = 1.0
        return vector

    def __call__(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        if kwargs.get("eta", 0.0) or kwargs.get("variance_noise") is not None:
            return self.plain_step(model_output, timestep, sample, *args, **kwargs)  # noise: not linear
        if self.size == 0:  # two basis vectors per step; steps beyond the schedule are the caller's error
            self.size = 2 * (len(self.scheduler.timesteps) + 2)
        sample_index, output_index = 2 * self.calls, 2 * self.calls + 1
        if output_index >= self.size:
            raise RuntimeError(f"fused scheduler step: more steps than the {len(self.scheduler.timesteps)} scheduled")
        self.calls += 1
        self.tensors[sample_index], self.tensors[output_index] = sample, model_output
        while len(self.tensors) > 2 * HISTORY_STEPS:
            self.tensors.popitem(last=False)
        kwargs = {**kwargs, "generator": None} if "generator" in kwargs else kwargs
        result = self.plain_step(self._probe(output_index), self._host_timestep(timestep),
                                 self._probe(sample_index), *args, **kwargs)
        return self._realise(result, model_output.dtype, output_index)

    def _realise(self, result, dtype: torch.dtype, output_index: int):
        """The scheduler's output with each probe vector replaced by the real tensor it weighs.

        The same kernel also writes a copy of this step's model output, which later steps read
        instead of the original: without classifier-free guidance the model output is the UNet's
        own output, which under CUDA graphs lives in the graph's static memory and is overwritten
        by the next step's replay (torch then refuses any read of it). fp16 → fp32 → fp16 is exact."""
        if isinstance(result, tuple):
            fields = list(result)
        else:
            fields = [getattr(result, name) for name in result.keys()]
        vectors = [i for i, value in enumerate(fields) if isinstance(value, torch.Tensor)]
        # numpy for the bookkeeping: a few µs where torch's small-tensor calls cost tens each
        copy = np.zeros(self.size)
        copy[output_index] = 1.0
        weights = np.stack([*(fields[i].numpy() for i in vectors), copy]).astype(np.float64)
        used = [int(i) for i in np.flatnonzero(np.abs(weights).sum(0))]
        missing = [i for i in used if i not in self.tensors]
        if missing:  # a scheduler reaching further back than HISTORY_STEPS: never guess
            raise RuntimeError(f"fused scheduler step: {type(self.scheduler).__name__} reads tensors "
                               f"older than {HISTORY_STEPS} steps")
        real = [self.tensors[i] for i in used]
        # Always ROWS rows whatever the scheduler returns (dynamo specialises a count of 1); the
        # copy is the last.
        table = np.zeros((max(ROWS, len(weights)), len(used)), dtype=np.float32)
        table[:len(vectors)] = weights[:len(vectors), used]
        table[-1] = weights[-1, used]
        table = torch.from_numpy(table)
        if real[0].device.type == "cuda":  # pinned: the copy is queued, the CPU does not wait
            table = table.pin_memory().to(real[0].device, non_blocking=True)
        outputs = _combine(table, real, dtype, self.compiled)
        for i, value in zip(vectors, outputs):
            fields[i] = value
        self.tensors[output_index] = outputs[-1]
        if isinstance(result, tuple):
            return tuple(fields)
        return type(result)(**dict(zip(result.keys(), fields)))


def install(scheduler: object, compiled: bool = True) -> bool:
    """Give this scheduler instance (a fresh one per pipeline call) the fused step; False, and
    the scheduler untouched, when its step is not linear. Its class, config and name stay the
    same, so records still name the diffusers scheduler that ran."""
    if not supports(scheduler):
        return False
    scheduler.step = LinearStep(scheduler, compiled)
    return True
