"""The Discord side (issues 2 and 6) against the issues' wording and Discord's documented limits:
the model select offers only the server's allowed models, /models stays within the embed limits
with a large catalog, Cancel answers within Discord's 3 seconds while a position edit holds the
message, a re-encoded image keeps its generation record, and a failed job's message does not stay
on its progress bar.

All fast (no GPU, no service processes): a real redis-server (the session fixture) and stand-ins
for the Discord interaction where a handler needs one.
"""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import discord
import numpy as np
from PIL import Image
from redis import Redis

from core.admission import Requester, admit, enqueue_moderated
from core.jobs import Delivery, ImageModeration, JobResult, Reproducibility, Timings
from core.policy import GuildPolicy
from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.user_settings import UserSettingsStore
from core.validation import ImagineOptions
from settings.catalog import build_catalog
from settings.config import Settings

GUILD, CHANNEL, AUTHOR = 7, 9, 42


# -- helpers -----------------------------------------------------------------------------------
def discord_embed_problems(embeds: list[dict]) -> list[str]:
    """Discord's documented embed limits (Channel > Embed Limits): title 256, description 4096,
    25 fields, field name 256 / value 1024, footer 2048, author 256, and 6000 characters over
    every embed of one message."""
    problems, total = [], 0
    if len(embeds) > 10:
        problems.append(f"{len(embeds)} embeds")
    for embed in embeds:
        title, description = embed.get("title") or "", embed.get("description") or ""
        footer = (embed.get("footer") or {}).get("text") or ""
        author = (embed.get("author") or {}).get("name") or ""
        fields = embed.get("fields") or []
        total += len(title) + len(description) + len(footer) + len(author)
        for name, size, limit in (("title", len(title), 256), ("description", len(description), 4096),
                                  ("footer", len(footer), 2048), ("author", len(author), 256),
                                  ("fields", len(fields), 25)):
            if size > limit:
                problems.append(f"{name} {size} > {limit}")
        for field in fields:
            total += len(field["name"]) + len(field["value"])
            if len(field["name"]) > 256 or len(field["value"]) > 1024:
                problems.append(f"field {field['name'][:20]!r} over its limit")
    if total > 6000:
        problems.append(f"embeds total {total} > 6000")
    return problems


class Response:
    """``interaction.response``: records what was sent, and when the first answer went out."""

    def __init__(self):
        self.sent: list[dict] = []
        self.first_at: float | None = None

    def _mark(self):
        if self.first_at is None:
            self.first_at = time.monotonic()

    def is_done(self) -> bool:
        return self.first_at is not None

    async def send_message(self, content=None, **kwargs):
        self._mark()
        self.sent.append({"content": content, **kwargs})

    async def defer(self, **kwargs):
        self._mark()
        self.sent.append({"defer": True, **kwargs})


def interaction(services, *, user_id: int = AUTHOR, manage_guild: bool = False):
    followup = SimpleNamespace(send=Response().send_message)
    return SimpleNamespace(client=SimpleNamespace(services=services), user=SimpleNamespace(id=user_id),
                           guild_id=GUILD, channel_id=CHANNEL, id=5, application_id=1, token="tok",
                           permissions=SimpleNamespace(manage_guild=manage_guild), response=Response(),
                           followup=followup, command=None, filesize_limit=10 * 1024 * 1024)


def services_for(redis_url: str, prefix: str, catalog=None):
    from bot.services import Services

    settings = Settings(_env_file=None, redis_url=redis_url, queue_prefix=prefix)
    jobs = JobQueue(Redis.from_url(redis_url), settings)
    return Services(settings=settings, catalog=catalog or build_catalog(), jobs=jobs,
                    policies=PolicyStore(jobs.redis, prefix, jobs.job_lifetime_s()),
                    user_settings=UserSettingsStore(jobs.redis, prefix))


def delivery() -> Delivery:
    return Delivery(application_id=1, interaction_id=5, interaction_token="tok", channel_id=CHANNEL,
                    guild_id=GUILD, user_id=AUTHOR)


def generation_for(request, image: Image.Image | None = None):
    from worker.generate import Generation

    images = [image or Image.new("RGB", (request.width, request.height), "gray")] * request.count
    return Generation(images, request.seeds(), 1.0, time.time(), scheduler="EulerDiscreteScheduler",
                      moderation=tuple(ImageModeration(score=0.0, flagged=False, action="show")
                                       for _ in images))


def record_for(request) -> Reproducibility:
    return Reproducibility(model=request.model, source="nota-ai/bk-sdm-small", pipeline="StableDiffusionPipeline",
                           scheduler="EulerDiscreteScheduler", diffusers_version="0.42.1", seeds=request.seeds(),
                           steps=request.steps, guidance=request.guidance, width=request.width,
                           height=request.height, prompt=request.prompt, negative_prompt=request.negative_prompt)


# -- 1. issue 6: the model-switch select offers models the server does not allow ---------------
def test_model_switch_select_offers_only_the_servers_allowed_models(redis_server, monkeypatch):
    """Issue 6: "🔀 Same prompt on another model (a select of the *other allowed models*, same
    seed)": in a server that allows two models the select offers the other one only (any other
    pick would be refused by the same policy)."""
    from worker import results
    from worker.delivery import Posted

    redis = Redis.from_url(redis_server.url)
    settings, catalog = Settings(_env_file=None, queue_prefix="audit-a"), build_catalog()
    policies = PolicyStore(redis, "audit-a")
    redis.set(policies.policy_key(GUILD), GuildPolicy(allowed_models=("bk-sdm-small", "sd-v1-4")).model_dump_json())
    request = admit(ImagineOptions("a fox", model="bk-sdm-small"),
                    Requester(user_id=AUTHOR, guild_id=GUILD, channel_id=CHANNEL, exempt=True),
                    job_id="ix-audit-a", settings=settings, catalog=catalog, policies=policies,
                    delivery=delivery()).request
    sent = {}

    def deliver(delivery, content, embed, uploads, view, *args, **kwargs):
        sent["components"] = view.to_components()
        return Posted(1, "webhook")

    monkeypatch.setattr(results, "deliver_result", deliver)
    runtime = SimpleNamespace(redis=redis, key_prefix="audit-a", settings=settings, catalog=catalog, session=None,
                              bot_token=None, outcomes=SimpleNamespace(record=lambda *a, **k: None,
                                                                        get=lambda job_id: None))
    result = JobResult(job_id=request.job_id, model=request.model, seeds=request.seeds(), width=request.width,
                       height=request.height, timings=Timings(queue_wait_ms=1, inference_ms=1, total_ms=2),
                       reproducibility=record_for(request))
    results.post_result(runtime, request, generation_for(request), result, None)
    offered = [option["value"] for row in sent["components"] for item in row["components"]
               if item["type"] == 3 for option in item["options"]]
    assert offered == ["sd-v1-4"], f"the select offers models this server does not allow: {offered}"


# -- 2. issue 2 + embed limits: /models breaks with a larger catalog ----------------------------
def test_models_answer_stays_within_discords_embed_limits_with_a_larger_catalog(redis_server):
    """Issue 2: "/models lists the models". The catalog takes any number of operator models (the
    result select and autocomplete cut theirs at Discord's 25); /models' one line of ~120-170
    characters per model must stop within Discord's 4096-character description (and 6000 total),
    or Discord answers 400 and the command fails."""
    from bot.commands.models import list_models

    overrides = {f"community-model-{i:02d}": {"source": f"some-organisation/stable-diffusion-finetune-{i:02d}",
                                              "pipeline": "StableDiffusionPipeline", "native_size": 512,
                                              "description": "a community fine-tune"}
                 for i in range(36)}
    services = services_for(redis_server.url, "audit-b", build_catalog(overrides))
    asked = interaction(services)
    asyncio.run(list_models.callback(asked))
    answer = asked.response.sent[0]
    embeds = [e.to_dict() for e in ([answer["embed"]] if answer.get("embed") else answer.get("embeds") or [])]
    assert embeds, "no embed sent"
    assert not discord_embed_problems(embeds), discord_embed_problems(embeds)


# -- 3. Discord's 3 s deadline: Cancel waits on a position-edit lease before answering ----------
def test_cancel_button_answers_within_discords_three_seconds_while_a_position_edit_is_in_flight(
        redis_server, monkeypatch):
    """An interaction must get its initial response within 3 s. A cancel waits until a worker's
    queue-position edit of that message releases its lease (up to 15 s: a 429 retry or a slow
    Discord keeps it), so the /queue Cancel button (and /cancel) acknowledge first."""
    from bot import buttons

    async def no_notify(*args, **kwargs):
        return True

    monkeypatch.setattr(buttons, "notify", no_notify)
    services = services_for(redis_server.url, "audit-c")
    enqueue_moderated(ImagineOptions("a fox"), Requester(user_id=AUTHOR, guild_id=GUILD, channel_id=CHANNEL, exempt=True),
                      jobs=services.jobs, policies=services.policies, job_id="ix-audit-c",
                      settings=services.settings, catalog=services.catalog, delivery=delivery())
    # A worker is editing this job's queued message right now (refresh_queued_messages holds
    # the lease for the length of its HTTP edit, 429 back-off included).
    services.jobs.redis.set("audit-c:position-edit:ix-audit-c", 1, px=6000)
    clicked = interaction(services)
    started = time.monotonic()
    asyncio.run(buttons.CancelButton("ix-audit-c").callback(clicked))
    assert clicked.response.first_at is not None, "no answer at all"
    waited = clicked.response.first_at - started
    assert waited < 2.5, f"the first answer went out after {waited:.1f} s (Discord allows 3 s)"


# -- 4. issue 6: a re-encoded result loses its generation record -------------------------------
def test_image_reencoded_to_fit_the_upload_limit_keeps_its_generation_record(redis_server):
    """Issue 2: an image over the interaction's file-size limit is re-encoded, never dropped;
    issue 6: each result's seed, model, steps… are "stored in the PNG text metadata". The JPEG
    made when the PNG is over the limit carries the same record."""
    from worker.results import uploads_for

    request = admit(ImagineOptions("a fox", model="bk-sdm-small", size=512, seed=1234),
                    Requester(user_id=AUTHOR, guild_id=None, channel_id=CHANNEL, exempt=True),
                    job_id="ix-audit-d", settings=Settings(_env_file=None), catalog=build_catalog(),
                    policies=PolicyStore(Redis.from_url(redis_server.url), "audit-d"), delivery=delivery()).request
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    record = record_for(request)
    [upload] = uploads_for(generation_for(request, noise), record, 300_000)  # the PNG is ~790 kB
    assert len(upload.data) <= 300_000 and not upload.filename.endswith(".png")  # re-encoded, as designed
    image = Image.open(io.BytesIO(upload.data))
    exif = image.getexif()
    found = " ".join(str(v) for v in [*image.info.values(), *exif.values(),
                                      *exif.get_ifd(0x8769).values()])
    assert "1234" in found and "bk-sdm-small" in found, "the re-encoded file carries no generation record"


# -- 5. issue 6: a failed job leaves its message stuck on the progress bar ----------------------
def test_a_job_that_fails_for_good_does_not_stay_shown_as_generating(redis_server, fake_discord):
    """Issue 6: "while generating, a step progress bar … Final message replaces it": a job that
    fails for good replaces its "🖌️ Generating … ▰▰▰▱ 7/12" message with the failure too (the
    follow-up still pings the user)."""
    import requests
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from core.jobs import JobRequest
    from core.texts import generating_text
    from worker.delivery import edit_original, use_api_base
    from worker.failures import Reporter
    from worker.outcomes import Outcomes

    use_api_base(fake_discord.api_base)
    redis = Redis.from_url(redis_server.url)
    token = "audit-e-token"
    request = JobRequest(job_id="ix-audit-e", model="bk-sdm-small", prompt="a fox", steps=12, guidance=7.5,
                         seed=1, size=512, count=1,
                         delivery=Delivery(application_id=1, interaction_id=5, interaction_token=token,
                                           channel_id=CHANNEL, guild_id=GUILD, user_id=AUTHOR))
    session = requests.Session()
    # What the worker's progress reporter last put in the user's message before the job died.
    edit_original(request.delivery, session, generating_text(request.model, request.prompt, 1, 7, 12))
    job = Job.create("worker.job_functions.run", args=[request.model_dump(mode="json")], id=request.job_id,
                     connection=redis, serializer=JSONSerializer)
    job.save()
    assert Reporter(Outcomes(redis, "audit-e", 3600), session).tell(job, "Your image could not be generated.")
    edits = fake_discord.messages("edit", token)
    latest = edits[-1].payload.get("content") or ""
    assert "Generating" not in latest and "▰" not in latest, \
        f"the user's message still says {latest!r} after the job failed"


def test_a_failure_told_late_never_replaces_images_already_delivered(redis_server, fake_discord):
    """A failure told after the images went out (the record of the delivery lost with a full
    Redis, a lease lapsed): the follow-up says so, but the result message is left as it is."""
    import requests
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from core.jobs import JobRequest
    from worker.delivery import _webhook, use_api_base
    from worker.failures import Reporter
    from worker.outcomes import Outcomes

    use_api_base(fake_discord.api_base)
    redis = Redis.from_url(redis_server.url)
    token = f"late-failure-{time.monotonic_ns()}"
    request = JobRequest(job_id=f"ix-late-{time.monotonic_ns()}", model="bk-sdm-small", prompt="a fox", steps=12,
                         guidance=7.5, seed=1, size=512,
                         delivery=Delivery(application_id=1, interaction_id=6, interaction_token=token,
                                           channel_id=CHANNEL, guild_id=GUILD, user_id=AUTHOR))
    session = requests.Session()
    _webhook(request.delivery, session).edit_message("@original", content=f"<@{AUTHOR}>",
                                                     embed=discord.Embed(description="a fox"))
    job = Job.create("worker.job_functions.run", args=[request.model_dump(mode="json")], id=request.job_id,
                     connection=redis, serializer=JSONSerializer)
    job.save()
    assert Reporter(Outcomes(redis, "late", 3600), session).tell(job, "Your image could not be generated.")
    assert len(fake_discord.messages("edit", token)) == 1  # the result's own edit only
    assert "could not be generated" in fake_discord.messages("followup", token)[0].payload["content"]
