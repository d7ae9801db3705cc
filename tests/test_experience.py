"""The Discord experience through the fake Discord, with real bot and worker processes:
queue position and ETA, rate-limited progress edits, result buttons (also after a bot
restart), delete rights, ℹ Info, /queue with cancel."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from PIL import Image
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.fleet import FleetStats
from core.jobs import job_id_for_interaction
from core.queue import READ_CACHE_S
from tests.support.fake_discord import (
    MANAGE_GUILD,
    component_interaction,
    slash_command,
)
from tests.support.stack import wait_for

PREFIX = "ux"  # this module's own Redis keys: fleet numbers start empty
INTERVAL = 0.4  # progress edit interval for these tests (the default is 1.5 s)
AUTHOR, STRANGER = "820000000000000001", "820000000000000777"


class Stack:
    def __init__(self, fake, env, redis_url, processes):
        self.fake, self.env, self.processes = fake, env, processes
        self.redis = Redis.from_url(redis_url)

    def restart_bot(self):
        self.processes["bot"].stop()
        self.processes.bot(self.env)


@pytest.fixture(scope="module")
def stack(env, fake_discord, redis_server, processes, tiny_model_dir, tiny_xl_model_dir):
    models = json.loads(env["IMAGINE_MODELS"])
    models["tiny-xl"] = {"source": str(tiny_xl_model_dir), "pipeline": "StableDiffusionXLPipeline",
                         "native_size": 64, "default_steps": 2, "variant": None,
                         "description": "tiny random SDXL"}
    env = {**env, "IMAGINE_QUEUE_PREFIX": PREFIX, "IMAGINE_MODELS": json.dumps(models),
           "IMAGINE_WORKER_MODELS": json.dumps(["tiny", "tiny-xl"]),
           "IMAGINE_PROGRESS_INTERVAL_S": str(INTERVAL), "IMAGINE_PROGRESS_PREVIEW": "true"}
    processes.worker(env)
    processes.bot(env)
    return Stack(fake_discord, env, redis_server.url, processes)


# -- helpers ---------------------------------------------------------------------------------
def command(stack, name: str, user_id: str = AUTHOR, **options):
    payload = slash_command(name, options, user_id=user_id)
    stack.fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def click(stack, custom_id: str, message: dict, user_id: str = AUTHOR, values=None, permissions=None):
    extra = {} if permissions is None else {"permissions": permissions}
    payload = component_interaction(custom_id, message, values=values, user_id=user_id, **extra)
    stack.fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def reply(stack, payload, timeout: float = 10):
    return wait_for(lambda: stack.fake.messages("callback", payload["token"]), timeout, what="reply")[0]


def deferred_reply(stack, payload, timeout: float = 10) -> dict:
    """The answer to an interaction acknowledged first ("thinking", type 5): its followup."""
    answered = stack.fake.reply(payload, timeout)
    assert answered["type"] == 5
    return answered["data"]


def result(stack, payload, timeout: float = 60):
    """The edit that replaced the queued message with the images."""
    edits = lambda: [p for p in stack.fake.messages("edit", payload["token"]) if p.payload.get("embeds")]
    return wait_for(edits, timeout, what="result")[0]


def fields(post) -> dict[str, str]:
    return {f["name"]: f["value"] for f in post.payload["embeds"][0]["fields"]}


def custom_ids(message: dict) -> list[str]:
    return [c["custom_id"] for row in message["components"] for c in row["components"]]


def job_of(stack, payload) -> dict:
    """The job request the interaction made (the answer goes out just before the enqueue)."""
    job_id = job_id_for_interaction(int(payload["id"]))
    wait_for(lambda: Job.exists(job_id, connection=stack.redis), 5, what="enqueued")
    return Job.fetch(job_id, connection=stack.redis, serializer=JSONSerializer).args[0]


# -- tests -----------------------------------------------------------------------------------
def test_eta_appears_once_a_few_jobs_have_run(stack):
    fleet = FleetStats(stack.redis, PREFIX, min_samples=3)
    first = command(stack, "imagine", prompt="first job on a fresh fleet", seed=1)
    text = reply(stack, first).payload["data"]["content"]
    assert "position **#1**" in text and "ETA" not in text  # no numbers yet: no guess
    result(stack, first)
    for seed in (2, 3):
        result(stack, command(stack, "imagine", prompt="warming the numbers", seed=seed))
    # The worker records a job's time just after posting its result.
    wait_for(lambda: fleet.latency("tiny"), 10, what="three jobs recorded")
    time.sleep(READ_CACHE_S)  # the bot reads latency samples at most once per READ_CACHE_S
    later = command(stack, "imagine", prompt="now with an estimate", seed=4)
    assert re.search(r"position \*\*#1\*\* in its queue · ETA ~\d+ s", reply(stack, later).payload["data"]["content"])
    result(stack, later)
    wait_for(lambda: fleet.latency("tiny").samples == 4, 10, what="four jobs recorded")
    time.sleep(READ_CACHE_S)
    models = reply(stack, command(stack, "models")).payload["data"]["embeds"][0]["description"]
    assert re.search(r"\*\*tiny\*\* — .*⏱ p50 \d+ s, p95 \d+ s per job \(4 recent\)", models)


def test_progress_edits_are_rate_limited_then_replaced_by_the_result(stack):
    payload = command(stack, "imagine", prompt="a slow detailed landscape", steps=40, size=192, seed=9)
    final = result(stack, payload, timeout=120)
    edits = stack.fake.messages("edit", payload["token"])
    progress = [e for e in edits if e.payload.get("content", "").startswith("🖌️ Generating")]
    assert len(progress) >= 2, f"expected several progress edits, got {len(progress)}"
    assert edits.index(final) == len(edits) - 1, "no progress edit may land after the result"
    gaps = [b.at - a.at for a, b in zip(progress, progress[1:])]
    assert min(gaps) >= INTERVAL * 0.9, f"edits closer than the interval: {gaps}"
    duration = progress[-1].at - progress[0].at
    assert len(progress) <= duration / INTERVAL + 1
    steps = [int(re.search(r"[▰▱]{12} (\d+)/40", e.payload["content"]).group(1)) for e in progress]
    assert steps == sorted(steps) and steps[-1] <= 40
    previews = [e for e in progress if e.files]
    assert previews, "preview is enabled"
    name, data = previews[0].files[0]
    # A new server spoilers flagged images, and a preview comes before the check: a spoiler too.
    assert name == "SPOILER_preview.png" and Image.open(io.BytesIO(data)).size == (128, 128)
    # The result carries the buttons and the model select (other models, not this one).
    ids = custom_ids(final.payload)
    job_id = job_id_for_interaction(int(payload["id"]))
    assert ids == [f"img:{a}:{job_id}" for a in ("reroll", "vary", "info", "delete", "remix", "model")] + [
        f"img:{a}:{job_id}:0" for a in ("subtle", "strong", "upscale")]  # per image: Vary ×2, Upscale ×2
    select = final.payload["components"][1]["components"][0]
    assert "tiny" not in [o["value"] for o in select["options"]] and "tiny-xl" in [o["value"] for o in select["options"]]
    assert final.payload["content"] == f"<@{AUTHOR}>" and not final.files[0][0] == "preview.png"


def test_waiting_messages_follow_their_position(stack):
    slow = command(stack, "imagine", prompt="a slow one in front", steps=40, size=192, seed=11)
    generating = lambda: [e for e in stack.fake.messages("edit", slow["token"])
                          if e.payload.get("content", "").startswith("🖌️")]
    wait_for(generating, 30, what="slow job generating")
    behind = []
    for i in (1, 2):
        # Different step counts: compatible jobs would be batched into one pipeline call.
        behind.append(command(stack, "imagine", prompt=f"behind #{i}", seed=20 + i, steps=1 + i))
        assert f"position **#{i}**" in reply(stack, behind[-1]).payload["data"]["content"]
        job_of(stack, behind[-1])
    # When the slow job is done and the next one starts, the last one moves up to #1.
    moved = wait_for(lambda: [e for e in stack.fake.messages("edit", behind[1]["token"])
                              if "position **#1**" in e.payload.get("content", "")], 60, what="position update")
    assert re.search(r"position \*\*#1\*\* in its queue · ETA ~\d+ s", moved[0].payload["content"])
    assert result(stack, behind[1]).at > moved[0].at


@pytest.fixture(scope="module")
def base(stack):
    """One finished result to click on: seed 100, a chosen negative prompt, 1 image."""
    payload = command(stack, "imagine", prompt="a red fox in snow", negative_prompt="blurry", seed=100)
    return payload, result(stack, payload)


def test_reroll_keeps_settings_with_a_new_seed(stack, base):
    payload, post = base
    job_id = job_id_for_interaction(int(payload["id"]))
    clicked = click(stack, f"img:reroll:{job_id}", post.message)
    assert "Queued 1 image on **tiny**" in reply(stack, clicked).payload["data"]["content"]
    args = job_of(stack, clicked)
    assert (args["prompt"], args["negative_prompt"], args["model"], args["count"]) == ("a red fox in snow", "blurry", "tiny", 1)
    assert args["seed"] != 100
    assert fields(result(stack, clicked))["Seed"] == str(args["seed"])


def test_variations_use_the_next_seeds(stack, base):
    payload, post = base
    clicked = click(stack, f"img:vary:{job_id_for_interaction(int(payload['id']))}", post.message)
    reply(stack, clicked)
    args = job_of(stack, clicked)
    assert (args["seed"], args["count"], args["prompt"]) == (101, 4, "a red fox in snow")
    final = result(stack, clicked)
    assert fields(final)["Seeds"] == "101, 102, 103, 104"
    assert [n for n, _ in final.files][-1] == "imagine-tiny-grid.png"
    grid = Image.open(io.BytesIO(final.files[-1][1]))
    assert grid.size == (128, 128)  # 2×2 of 64 px
    assert final.payload["embeds"][0]["image"]["url"] == "attachment://imagine-tiny-grid.png"


def test_model_switch_runs_same_prompt_and_seed_on_the_other_model(stack, base):
    payload, post = base
    clicked = click(stack, f"img:model:{job_id_for_interaction(int(payload['id']))}", post.message,
                    values=["tiny-xl"])
    reply(stack, clicked)
    args = job_of(stack, clicked)
    assert (args["model"], args["seed"], args["prompt"]) == ("tiny-xl", 100, "a red fox in snow")
    final = result(stack, clicked)
    assert fields(final)["Model"] == "tiny-xl" and fields(final)["Seed"] == "100"
    assert "StableDiffusionXLPipeline" in final.payload["embeds"][0]["footer"]["text"]


def test_info_and_png_metadata_record_how_images_were_made(stack, base):
    payload, post = base
    clicked = click(stack, f"img:info:{job_id_for_interaction(int(payload['id']))}", post.message,
                    user_id=STRANGER)
    answer = reply(stack, clicked).payload["data"]
    assert answer["flags"] & 64
    info = {f["name"]: f["value"] for f in answer["embeds"][0]["fields"]}
    assert info["Pipeline"] == "StableDiffusionPipeline" and info["Scheduler"] == "EulerDiscreteScheduler"
    assert info["Seeds"] == "100" and info["Size"] == "64×64" and info["diffusers"].startswith("0.")
    text = Image.open(io.BytesIO(post.files[0][1])).text
    assert (text["seed"], text["scheduler"], text["pipeline"], text["steps"]) == (
        "100", "EulerDiscreteScheduler", "StableDiffusionPipeline", "2")
    assert text["prompt"] == "a red fox in snow" and text["negative_prompt"] == "blurry"
    assert text["diffusers_version"] == info["diffusers"] and text["width"] == "64"


def test_only_the_author_or_a_manager_can_delete(stack):
    payload = command(stack, "imagine", prompt="a picture to delete", seed=5)
    post = result(stack, payload)
    delete_id = f"img:delete:{job_id_for_interaction(int(payload['id']))}"
    refused = click(stack, delete_id, post.message, user_id=STRANGER)
    answer = reply(stack, refused).payload
    assert answer["data"]["flags"] & 64 and "Only the person who asked" in answer["data"]["content"]
    manager = click(stack, delete_id, post.message, user_id=STRANGER, permissions=str(MANAGE_GUILD))
    wait_for(lambda: stack.fake.messages("delete", manager["token"]), 10, what="manager delete")
    # The bot has handled the later click: a delete for the refused one would be here by now.
    assert not stack.fake.messages("delete", refused["token"])
    author = click(stack, delete_id, post.message)
    assert reply(stack, author).payload["type"] == 6  # acknowledged as an update of that message
    deleted = wait_for(lambda: stack.fake.messages("delete", author["token"]), 10, what="author delete")
    assert deleted[0].message_id == "@original"


def test_buttons_still_work_after_the_bot_restarts(stack):
    payload = command(stack, "imagine", prompt="a result older than the bot", seed=77)
    post = result(stack, payload)
    stack.restart_bot()
    clicked = click(stack, f"img:vary:{job_id_for_interaction(int(payload['id']))}", post.message)
    assert "Queued 4 images" in reply(stack, clicked).payload["data"]["content"]
    assert fields(result(stack, clicked))["Seeds"] == "78, 79, 80, 81"


def test_queue_lists_own_jobs_and_cancels(stack):
    # sdxl-base has no worker here, so these jobs wait.
    waiting = []
    for i in (1, 2):
        waiting.append(command(stack, "imagine", prompt=f"waiting #{i}", model="sdxl-base", steps=2))
        assert f"position **#{i}**" in reply(stack, waiting[-1]).payload["data"]["content"]
        job_of(stack, waiting[-1])
    other = command(stack, "imagine", user_id=STRANGER, prompt="someone else's", model="sdxl-base", steps=2)
    reply(stack, other)
    listing = reply(stack, command(stack, "queue"))
    description = listing.payload["data"]["embeds"][0]["description"]
    assert "**sdxl-base** · #1 in queue — waiting #1" in description
    assert "**sdxl-base** · #2 in queue — waiting #2" in description
    assert "someone else's" not in description and listing.payload["data"]["flags"] & 64
    first_job = job_id_for_interaction(int(waiting[0]["id"]))
    assert custom_ids(listing.message)[:2] == [f"img:cancel:{first_job}",
                                               f"img:cancel:{job_id_for_interaction(int(waiting[1]['id']))}"]
    refused = click(stack, f"img:cancel:{first_job}", listing.message, user_id=STRANGER)
    assert "only cancel your own" in deferred_reply(stack, refused)["content"]
    cancelled = click(stack, f"img:cancel:{first_job}", listing.message)
    assert "Cancelled" in deferred_reply(stack, cancelled)["content"]
    job = Job.fetch(first_job, connection=stack.redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.CANCELED
    edit = wait_for(lambda: stack.fake.messages("edit", waiting[0]["token"]), 10, what="cancel notice")
    assert edit[-1].payload["content"].startswith("🚫 Cancelled")
    description = reply(stack, command(stack, "queue")).payload["data"]["embeds"][0]["description"]
    assert "waiting #1" not in description and "**sdxl-base** · #1 in queue — waiting #2" in description
    for payload in (waiting[1], other):  # leave no waiting jobs behind
        job_id = job_id_for_interaction(int(payload["id"]))
        Job.fetch(job_id, connection=stack.redis, serializer=JSONSerializer).cancel()
