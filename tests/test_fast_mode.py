"""Fast mode (``quality: fast``) and per-user settings: resolution and the server's forced
negative prompt (pure), batch separation, the worker switching a tiny random LoRA and
scheduler per call on one copy of the weights, and /settings + /imagine quality:fast end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from redis import Redis

from core.admission import Requester, admit
from core.fleet import work_units
from core.jobs import JobRequest
from core.policy import GuildPolicy, PolicyViolation, apply_policy
from core.policy_store import PolicyStore
from core.user_settings import UserSettings, UserSettingsStore, check_settings
from core.validation import ImagineOptions, InvalidRequest, resolve_options
from settings.catalog import FastMode, ModelEntry, build_catalog
from settings.config import Settings
from worker.generate import batch_key, generate, generate_batch, reproducibility
from worker.pipelines import (
    ModelLoadError,
    ResidentPipelines,
    load_pipeline,
    weight_bytes,
)

CPU = torch.device("cpu")
SETTINGS = Settings(_env_file=None)
CATALOG = build_catalog()


def moderated(policy=GuildPolicy(), user=None, settings=SETTINGS, **options):
    return apply_policy(ImagineOptions(**{"prompt": "a cat", **options}), policy, job_id="j",
                        settings=settings, catalog=CATALOG, user=user)


# -- resolution and policy (pure) -----------------------------------------------------------------
def test_each_seed_model_has_its_fast_configuration():
    assert CATALOG["sd-v1-4"].fast.adapter == "latent-consistency/lcm-lora-sdv1-5"
    assert CATALOG["ssd-1b"].fast.adapter == "latent-consistency/lcm-lora-ssd-1b"
    assert CATALOG["sdxl-base"].fast.adapter == "latent-consistency/lcm-lora-sdxl"
    bk = CATALOG["bk-sdm-small"].fast
    assert bk.adapter is None and bk.scheduler == "DPMSolverMultistepScheduler"
    lcm = moderated(model="sd-v1-4", quality="fast").request
    assert (lcm.quality, lcm.steps, lcm.guidance) == ("fast", 4, 1.0)
    solver = moderated(model="bk-sdm-small", quality="fast").request
    assert (solver.steps, solver.guidance) == (12, CATALOG["bk-sdm-small"].default_guidance)
    assert moderated(model="sd-v1-4").request.quality == "standard"


def test_operators_change_the_adapter_without_code():
    catalog = build_catalog({"sd-v1-4": {"fast": {"adapter": "/models/lcm", "adapter_revision": "abc"}},
                             "ssd-1b": {"fast": None}})
    assert catalog["sd-v1-4"].fast.adapter == "/models/lcm" and catalog["sd-v1-4"].fast.steps == 4
    assert catalog["ssd-1b"].fast is None
    with pytest.raises(InvalidRequest, match="Fast mode is not available for `ssd-1b`"):
        resolve_options(ImagineOptions("a cat", model="ssd-1b", quality="fast"), SETTINGS, catalog)
    with pytest.raises(ValueError, match="LCMScheduler needs"):
        FastMode(adapter=None)


def test_fast_mode_refuses_guidance_its_adapter_cannot_take():
    with pytest.raises(InvalidRequest, match="up to 2"):
        moderated(model="sd-v1-4", quality="fast", guidance=7.5)
    with pytest.raises(InvalidRequest, match="`quality` must be one of"):
        moderated(quality="turbo")


def test_forced_negative_is_applied_in_fast_mode_with_guidance_that_reads_it():
    policy = GuildPolicy(forced_negative="nsfw")
    result = moderated(policy, model="sd-v1-4", quality="fast")
    assert result.request.guidance == SETTINGS.forced_negative_min_guidance == 2
    assert result.request.negative_prompt.startswith("nsfw") and result.request.forced_negative_applied
    assert any("fast mode runs at `guidance` 2" in note for note in result.notes)


def test_fast_mode_is_refused_where_the_forced_negative_needs_more_guidance_than_it_takes():
    strict = Settings(_env_file=None, forced_negative_min_guidance=3)
    policy = GuildPolicy(forced_negative="nsfw")
    with pytest.raises(PolicyViolation, match="fast mode on `sd-v1-4` works only up to 2"):
        moderated(policy, settings=strict, model="sd-v1-4", quality="fast")
    # Saved as the user's default: standard quality instead, and the user is told.
    result = moderated(policy, settings=strict, user=UserSettings(quality="fast"), model="sd-v1-4")
    assert result.request.quality == "standard" and result.request.guidance >= 3
    assert result.request.steps == CATALOG["sd-v1-4"].default_steps
    assert [rule for rule, _ in result.user_notes] == ["quality:forced_negative"]
    # A solver without an adapter keeps classifier-free guidance: the floor just applies.
    solver = moderated(policy, settings=strict, model="bk-sdm-small", quality="fast").request
    assert solver.quality == "fast" and solver.guidance >= 3


def test_modes_never_share_a_batch_and_etas_count_the_mode():
    standard = JobRequest(job_id="a", model="m", prompt="p", steps=4, guidance=1.0, seed=1, size=512)
    fast = standard.model_copy(update={"quality": "fast"})
    assert batch_key(standard) != batch_key(fast)
    with_cfg = standard.model_copy(update={"guidance": 2.0})
    assert work_units(fast) == work_units(with_cfg) / 2


# -- per-user settings (pure + Redis) ------------------------------------------------------------
def test_user_defaults_apply_and_the_servers_rules_win():
    user = UserSettings(model="sd-v1-4", steps=20, guidance=6.0, spoiler=True, negative_prompt="zebras")
    request = moderated(user=user).request
    assert (request.model, request.steps, request.guidance, request.spoiler) == ("sd-v1-4", 20, 6.0, True)
    assert request.negative_prompt == "zebras"
    # The command's own options beat the saved ones.
    assert moderated(user=user, steps=5, spoiler=False).request.steps == 5
    policy = GuildPolicy(allowed_models=("bk-sdm-small",), max_steps=10, banned_terms=("zebras",))
    result = moderated(policy, user=user)
    assert result.request.model == "bk-sdm-small" and result.request.steps == 10
    assert "zebras" not in result.request.negative_prompt
    assert {rule for rule, _ in result.user_notes} == {"model", "negative_prompt", "steps"}
    # Saved fast mode: the fast configuration's steps, not the saved standard ones.
    assert moderated(user=UserSettings(quality="fast", steps=30), model="sd-v1-4").request.steps == 4


def test_settings_are_checked_when_saved():
    with pytest.raises(InvalidRequest, match="Unknown model"):
        check_settings(UserSettings(model="dall-e"), SETTINGS, CATALOG)
    with pytest.raises(InvalidRequest, match="`steps` must be between"):
        check_settings(UserSettings(steps=999), SETTINGS, CATALOG)
    assert check_settings(UserSettings(model=" SD-v1-4 "), SETTINGS, CATALOG).model == "sd-v1-4"


def test_settings_are_stored_small_under_the_user_id_and_notes_are_told_once(redis_server):
    redis = Redis.from_url(redis_server.url)
    store, policies = UserSettingsStore(redis, "us"), PolicyStore(redis, "us")
    store.save(42, UserSettings(model="sd-v1-4", negative_prompt="secret words"))
    assert redis.keys("us:user:*") == [b"us:user:42"]
    assert len(redis.get("us:user:42")) < 200
    redis.set(policies.policy_key(7), GuildPolicy(allowed_models=("bk-sdm-small",)).model_dump_json())

    def notes():
        return admit(ImagineOptions("a cat"), Requester(user_id=42, guild_id=7, channel_id=None, exempt=True),
                     job_id="x", settings=SETTINGS, catalog=CATALOG, policies=policies,
                     user_settings=store).moderated.notes
    assert any("default model `sd-v1-4` is not allowed" in n for n in notes())
    assert notes() == ()  # told once
    store.reset(42)
    assert store.load(42) is None and not redis.keys("us:user:*")


# -- the worker: one copy of the weights, the adapter and scheduler per call ---------------------
@pytest.fixture(scope="module")
def fast_pipes(tiny_model_dir):
    entry = ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                       native_size=64, variant=None,
                       fast=FastMode(adapter=str(tiny_model_dir / "fast-lora"), steps=2))
    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    pipelines.load(entry)
    return entry, pipelines


def job(job_id="j", quality="standard", **fields) -> JobRequest:
    base = dict(job_id=job_id, model="tiny", prompt="an orange cat", negative_prompt="blurry", steps=3,
                guidance=7.5, seed=5, size=64, quality=quality)
    if quality == "fast":
        base.update(steps=2, guidance=1.0)
    return JobRequest(**{**base, **fields})


def pixels(generation) -> list[np.ndarray]:
    return [np.asarray(image) for image in generation.images]


def test_fast_and_standard_alternate_on_one_copy_of_the_weights(fast_pipes, tiny_model_dir):
    entry, pipelines = fast_pipes
    pipe = pipelines.get("tiny")
    plain = load_pipeline(entry.model_copy(update={"fast": None}), CPU, torch.float32)
    base_weight = pipe.unet.conv_in.base_layer.weight if hasattr(pipe.unet.conv_in, "base_layer") \
        else pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
    pointer, scheduler = base_weight.data_ptr(), pipe.scheduler

    standard_before = pixels(generate(pipe, job()))
    fast = generate(pipe, job(quality="fast"), fast=entry.fast)
    standard_after = pixels(generate(pipe, job()))
    fast_again = generate(pipe, job(quality="fast"), fast=entry.fast)

    assert all(np.array_equal(a, b) for a, b in zip(standard_before, standard_after)), "LoRA state leaked"
    assert all(np.array_equal(a, b) for a, b in zip(standard_before, pixels(generate(plain, job())))), \
        "with the adapter off, standard jobs must be the base model's exact pixels"
    assert all(np.array_equal(a, b) for a, b in zip(pixels(fast), pixels(fast_again))), "fast seed reproduces"
    assert not np.array_equal(pixels(fast)[0], standard_before[0])
    assert base_weight.data_ptr() == pointer and pipe.scheduler is scheduler  # nothing moved or swapped
    assert weight_bytes(pipe) < 1.5 * weight_bytes(plain)  # an adapter, not a second model
    assert (fast.scheduler, fast.adapter) == ("LCMScheduler", entry.fast.adapter)

    record = reproducibility(entry, pipe, job(quality="fast"), fast)
    assert (record.quality, record.scheduler, record.adapter) == ("fast", "LCMScheduler", entry.fast.adapter)
    png = record.png_text(5)
    assert png["quality"] == "fast" and png["adapter"] == entry.fast.adapter and png["scheduler"] == "LCMScheduler"


def test_batches_of_both_modes_interleaved_are_each_correct(fast_pipes):
    entry, pipelines = fast_pipes
    pipe = pipelines.get("tiny")
    alone = {q: pixels(generate(pipe, job(quality=q, seed=9), fast=entry.fast))[0] for q in ("standard", "fast")}
    with pytest.raises(ValueError, match="quality"):
        generate_batch(pipe, [job("a"), job("b", quality="fast")], fast=entry.fast)
    for round_ in range(2):
        for quality in ("fast", "standard", "fast", "standard"):
            batch = generate_batch(pipe, [job("a", quality, seed=9), job("b", quality, seed=9, prompt="a dog")],
                                   fast=entry.fast)
            # The same image as alone, up to float rounding: a batch of two runs other matmul
            # blockings, which may move a few pixels by one level (seen: 0.008 % of them).
            difference = np.abs(pixels(batch[0])[0].astype(int) - alone[quality].astype(int))
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (round_, quality)
    assert not np.array_equal(alone["fast"], alone["standard"])


def test_a_solver_fast_mode_needs_no_adapter(tiny_model_dir):
    solver = FastMode(scheduler="DPMSolverMultistepScheduler", steps=2, guidance=None, max_guidance=None)
    pipe = load_pipeline(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                                    native_size=64, variant=None, fast=solver), CPU, torch.float32)
    generation = generate(pipe, job(quality="fast", steps=2, guidance=7.5), fast=solver)
    assert generation.scheduler == "DPMSolverMultistepScheduler" and generation.adapter is None


def test_an_sd15_shaped_lora_does_not_fit_a_bk_sdm_unet(tmp_path, tiny_model_dir):
    """BK-SDM drops a block per stage: the teacher-shaped LoRA's up-block resnets have other
    input widths, and diffusers refuses the load (size mismatch) rather than half-apply it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from worker.tiny import tiny_sd, write_tiny_lora

    torch.manual_seed(0)
    teacher = tiny_sd()
    teacher.unet = UNet2DConditionModel(**{**dict(teacher.unet.config), "layers_per_block": 2,
                                           "mid_block_type": "UNetMidBlock2DCrossAttn"})
    assert isinstance(teacher, StableDiffusionPipeline)
    write_tiny_lora(tmp_path / "teacher-lora", teacher)
    entry = ModelEntry(key="bk", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline", native_size=64,
                       variant=None, fast=FastMode(adapter=str(tmp_path / "teacher-lora")))
    with pytest.raises(ModelLoadError, match="fast-mode adapter"):
        load_pipeline(entry, CPU, torch.float32)


def test_a_note_is_not_spent_on_a_refused_command(redis_server):
    """A command refused by the user's limits (or back-pressure) never shows its notes: the
    "told once" mark must not be taken then, or the user is never told."""
    redis = Redis.from_url(redis_server.url)
    store, policies = UserSettingsStore(redis, "un"), PolicyStore(redis, "un")
    store.save(42, UserSettings(model="sd-v1-4"))
    redis.set(policies.policy_key(7), GuildPolicy(allowed_models=("bk-sdm-small",),
                                                  max_active_jobs=1).model_dump_json())
    requester = Requester(user_id=42, guild_id=7, channel_id=None)

    def submit(job_id):
        return admit(ImagineOptions("a cat"), requester, job_id=job_id, settings=SETTINGS, catalog=CATALOG,
                     policies=policies, user_settings=store)
    first = submit("a")
    assert any("not allowed" in n for n in first.moderated.notes)
    store.redis.delete(store._key(42) + ":told")  # as if the first job had no note to tell
    with pytest.raises(PolicyViolation, match="max active jobs"):
        submit("b")  # refused: the user sees only the refusal
    policies.release(first.active_keys[0], "a")
    assert any("not allowed" in n for n in submit("c").moderated.notes)  # told now


@pytest.mark.parametrize("blank", [" ", "\t", "\x00"])
def test_a_blank_negative_prompt_does_not_bring_back_a_banned_saved_one(blank):
    """A negative prompt that cleans to nothing is no negative prompt: the saved one it falls
    back to is checked against the server's banned terms all the same."""
    policy = GuildPolicy(banned_terms=("gore",))
    result = moderated(policy, user=UserSettings(negative_prompt="gore, blood"), negative_prompt=blank)
    assert "gore" not in result.request.negative_prompt
    assert [rule for rule, _ in result.user_notes] == ["negative_prompt"]
