"""Output moderation without processes: the pure decision (core.output_policy), its admission
and admin edit, and the worker's step (worker.safety) with the tiny random classifier, where
the threshold decides what is flagged."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from redis import Redis

from core import policy_edits as edits
from core.jobs import JobRequest, Reproducibility, Timings
from core.output_policy import image_action, image_actions, notice, nsfw_action_for
from core.policy import GuildPolicy, apply_policy
from core.validation import ImagineOptions, InvalidRequest
from settings.catalog import ModelEntry
from settings.config import Settings
from tests.support.fake_discord import snowflake

CPU = torch.device("cpu")


# -- the pure decision -------------------------------------------------------------------------
@pytest.mark.parametrize("action, spoiler, flagged, expected", [
    ("off", False, False, "show"), ("off", False, True, "show"), ("off", True, True, "spoiler"),
    ("off", False, None, "show"),  # nothing to enforce
    ("spoiler", False, False, "show"), ("spoiler", False, True, "spoiler"), ("spoiler", True, False, "spoiler"),
    ("spoiler", False, None, "withhold"),  # the check failed: closed, never open
    ("block", False, False, "show"), ("block", True, False, "spoiler"), ("block", False, True, "withhold"),
    ("block", True, True, "withhold"), ("block", True, None, "withhold"),
])
def test_image_action(action, spoiler, flagged, expected):
    assert image_action(action, spoiler, flagged) == expected


def test_image_actions_of_a_failed_check_withhold_all():
    assert image_actions("spoiler", False, None, 3) == ["withhold"] * 3
    assert image_actions("block", False, [False, True], 2) == ["show", "withhold"]


def test_age_restricted_channels_have_their_own_setting_and_new_servers_default_to_spoiler():
    policy = GuildPolicy()
    assert nsfw_action_for(policy, channel_nsfw=False) == "spoiler"
    assert nsfw_action_for(policy, channel_nsfw=True) == "off"
    strict = GuildPolicy(nsfw_action="block", nsfw_action_age_restricted="spoiler")
    assert (nsfw_action_for(strict, False), nsfw_action_for(strict, True)) == ("block", "spoiler")


def test_admission_carries_the_action_and_the_users_spoiler_wish(tmp_path):
    settings = Settings(_env_file=None)
    catalog = settings.catalog()
    policy = GuildPolicy(nsfw_action="block", nsfw_action_age_restricted="off")
    here = apply_policy(ImagineOptions("a cat", spoiler=True), policy, job_id="j", settings=settings,
                        catalog=catalog).request
    assert (here.nsfw_action, here.spoiler) == ("block", True)
    there = apply_policy(ImagineOptions("a cat"), policy, job_id="j", settings=settings, catalog=catalog,
                         channel_nsfw=True).request
    assert (there.nsfw_action, there.spoiler) == ("off", False)


def test_jobs_queued_before_output_moderation_load_with_the_default():
    old = {"job_id": "old", "model": "tiny", "prompt": "p", "steps": 2, "guidance": 7.5, "seed": 1, "size": 64}
    request = JobRequest.model_validate(old)
    assert (request.nsfw_action, request.spoiler) == ("spoiler", False)


def test_admin_edit_and_its_audit_fields():
    policy = GuildPolicy()
    changed = edits.set_nsfw_actions(policy, elsewhere="block")
    assert edits.changed_fields(policy, changed) == {"nsfw_action": "block"}
    both = edits.set_nsfw_actions(changed, elsewhere="block", age_restricted="spoiler")
    assert edits.changed_fields(changed, both) == {"nsfw_action_age_restricted": "spoiler"}
    assert edits.set_nsfw_actions(both) == both
    with pytest.raises(InvalidRequest, match="off, spoiler, block"):
        edits.set_nsfw_actions(policy, elsewhere="blur")


def test_notice_names_images_by_position_not_seed():
    assert notice(["show", "show"], [False, False]) == ""
    text = notice(["show", "withhold", "spoiler", "withhold"], [False, True, True, True])
    assert "Images 2, 4 of 4 were withheld" in text and "image 3 of 4 may be NSFW" in text
    assert "content check failed" in notice(["withhold"], None)
    assert notice(["spoiler"], [False]) == ""  # the user's own wish needs no warning


# -- the worker's step, with the tiny random classifier ----------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from worker.pipelines import load_pipeline

    return load_pipeline(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline"),
                         CPU, torch.float32)


def checker(model_dir, threshold: float):
    from worker.safety import load_safety_checker

    return load_safety_checker(Settings(_env_file=None, safety_source=str(model_dir), safety_threshold=threshold),
                               CPU, torch.float32)


def request(**fields) -> JobRequest:
    return JobRequest(**{**dict(job_id="j", model="tiny", prompt="an orange cat", steps=2, guidance=7.5, seed=3,
                                size=64, count=3), **fields})


@pytest.fixture(scope="module")
def generation(pipe):
    from worker.generate import generate

    return generate(pipe, request())


def record_of(generation) -> Reproducibility:
    return Reproducibility(model="tiny", source="s", pipeline="P", scheduler="S", diffusers_version="0",
                           seeds=generation.seeds, steps=2, guidance=7.5, width=64, height=64, prompt="p")


def test_sd_pipelines_load_without_their_own_checker(pipe):
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_threshold_decides_what_the_tiny_classifier_flags(tiny_model_dir, generation):
    from worker.safety import moderate

    scores = checker(tiny_model_dir, 0.0).scores(generation.images)
    assert len(scores) == 3 and all(-2.0 <= s <= 0.02 for s in scores)
    assert len(set(scores)) == 3  # random concepts: the images score differently
    none = moderate(checker(tiny_model_dir, math.inf), request(nsfw_action="block"), generation)
    assert [v.flagged for v in none.moderation] == [False] * 3 and none.withheld == []
    every = moderate(checker(tiny_model_dir, -math.inf), request(nsfw_action="block"), generation)
    assert every.withheld == [0, 1, 2]
    middle = sorted(scores)[1]  # flags exactly the highest-scoring image
    some = moderate(checker(tiny_model_dir, middle), request(nsfw_action="block"), generation)
    top = scores.index(max(scores))
    assert some.withheld == [top] and [v.score for v in some.moderation] == [round(s, 4) for s in scores]


def test_blocked_and_spoilered_uploads(tiny_model_dir, generation):
    from worker.results import embed_image, uploads_for
    from worker.safety import moderate

    flag_all = checker(tiny_model_dir, -math.inf)
    blocked = moderate(flag_all, request(nsfw_action="block"), generation)
    assert uploads_for(blocked, record_of(blocked), 10 * 2**20) == []
    spoilered = moderate(flag_all, request(nsfw_action="spoiler"), generation)
    uploads = uploads_for(spoilered, record_of(spoilered), 10 * 2**20)
    assert [u.filename.startswith("SPOILER_") for u in uploads] == [True] * 4  # 3 images + grid
    assert embed_image(uploads) is None  # Discord would show an embed's image unblurred
    # One withheld of three: two files and a grid made of those two only.
    scores = flag_all.scores(generation.images)
    some = moderate(checker(tiny_model_dir, sorted(scores)[1]), request(nsfw_action="block"), generation)
    uploads = uploads_for(some, record_of(some), 10 * 2**20)
    assert len(uploads) == 3 and not any(u.filename.startswith("SPOILER_") for u in uploads)
    withheld_seed = generation.seeds[some.withheld[0]]
    assert all(f"-{withheld_seed}." not in u.filename for u in uploads)
    assert Image.open(io.BytesIO(uploads[-1].data)).size == (128, 64)  # the grid: two images
    assert embed_image(uploads) == uploads[-1].filename


def test_embed_and_info_do_not_show_a_withheld_images_seed(tiny_model_dir, generation):
    from bot.buttons import info_embed
    from core.records import JobRecord
    from worker.delivery import result_embed
    from worker.generate import reproducibility
    from worker.safety import moderate

    some = moderate(checker(tiny_model_dir, -math.inf), request(nsfw_action="block", count=3), generation)
    timings = Timings(queue_wait_ms=0, inference_ms=0, total_ms=0)
    embed = result_embed(request(), some.seeds, timings, withheld=some.withheld)
    seeds = next(f.value for f in embed.fields if f.name == "Seeds")
    assert seeds == "withheld, withheld, withheld"
    entry = ModelEntry(key="tiny", source="s", pipeline="StableDiffusionPipeline")
    record = reproducibility(entry, SimpleNamespace(scheduler=object()), request(), some)
    assert record.withheld == [0, 1, 2] and "withheld" not in record.png_text(3)
    info = info_embed(JobRecord(job_id="j", user_id=1, options={}, request=request(), result=record))
    shown = next(f.value for f in info.fields if f.name == "Seeds")
    assert shown == "image 1 withheld, image 2 withheld, image 3 withheld"


class Broken:
    device = CPU
    threshold = 0.0

    def scores(self, images):
        raise RuntimeError("classifier exploded")


@pytest.mark.parametrize("checker_, action, expected", [
    (Broken(), "spoiler", ["withhold"] * 3), (None, "block", ["withhold"] * 3), (Broken(), "off", ["show"] * 3)])
def test_a_failing_or_missing_classifier_fails_closed(generation, checker_, action, expected):
    from worker.safety import moderate

    moderated = moderate(checker_, request(nsfw_action=action), generation)
    assert moderated.actions == expected and all(v.score is None for v in moderated.moderation)


def test_unchecked_images_cannot_be_uploaded(generation):
    from worker.results import uploads_for

    with pytest.raises(RuntimeError, match="not checked"):
        uploads_for(generation, record_of(generation), 10 * 2**20)


def test_flagged_images_are_counted_per_model_and_action(tiny_model_dir, generation):
    from worker import metrics
    from worker.safety import moderate

    before = metrics.FLAGGED.labels("tiny", "block")._value.get()
    moderate(checker(tiny_model_dir, -math.inf), request(nsfw_action="block"), generation)
    assert metrics.FLAGGED.labels("tiny", "block")._value.get() == before + 3
    failures = metrics.CHECK_FAILURES.labels("tiny")._value.get()
    moderate(Broken(), request(), generation)
    assert metrics.CHECK_FAILURES.labels("tiny")._value.get() == failures + 1


def test_web_store_keeps_no_withheld_image_and_blurs_spoilers(redis_server, tiny_model_dir, generation):
    from worker.safety import moderate
    from worker.web_store import store_images

    redis = Redis.from_url(redis_server.url)
    scores = checker(tiny_model_dir, 0.0).scores(generation.images)
    job_id = f"web-{snowflake()}"
    # Block the highest-scoring image; the user asked for spoilers, so the others are blurred.
    some = moderate(checker(tiny_model_dir, sorted(scores)[1]), request(job_id=job_id, nsfw_action="block",
                                                                        spoiler=True), generation)
    job = SimpleNamespace(connection=redis, result_ttl=60)
    keys = store_images(job, request(job_id=job_id), some, "modtest")
    top = scores.index(max(scores))
    assert keys[top] == "" and redis.keys(f"modtest:images:{job_id}:{top}") == []
    for index, key in enumerate(keys):
        if index != top:
            stored = Image.open(io.BytesIO(redis.get(key))).convert("RGB")
            assert stored.tobytes() != generation.images[index].convert("RGB").tobytes()  # blurred


def test_previews_follow_the_jobs_action():
    from worker.progress import preview_name

    assert preview_name(request(nsfw_action="block")) is None
    assert preview_name(request(nsfw_action="spoiler")) == "SPOILER_preview.png"
    assert preview_name(request(nsfw_action="off")) == "preview.png"
    assert preview_name(request(nsfw_action="off", spoiler=True)) == "SPOILER_preview.png"


def test_a_classifier_that_cannot_load_is_one_line(tmp_path):
    from worker.pipelines import ModelLoadError
    from worker.safety import load_safety_checker

    with pytest.raises(ModelLoadError) as error:
        load_safety_checker(Settings(_env_file=None, safety_source=str(tmp_path)), CPU, torch.float32)
    assert "IMAGINE_SAFETY_SOURCE" in str(error.value) and "\n" not in str(error.value)


def test_a_classifier_that_loads_but_cannot_run_stops_the_worker_at_warm_up(tiny_model_dir, monkeypatch):
    """Otherwise the worker registers as ready and withholds every image it ever makes."""
    from worker.main import warm_up
    from worker.pipelines import ModelLoadError, ResidentPipelines

    pipelines = ResidentPipelines(device=CPU, dtype=torch.float32)
    pipelines.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline",
                              native_size=64))
    broken = checker(tiny_model_dir, 0.0)
    monkeypatch.setattr(broken.model, "visual_projection", None)  # e.g. weights of another width
    with pytest.raises(ModelLoadError, match="output classifier"):
        warm_up(pipelines, Settings(_env_file=None, device="cpu"), broken)
