"""The whole way: gateway INTERACTION_CREATE → real bot process → Redis/RQ → real worker
process with a tiny pipeline → the queued message replaced (edited) with the PNG attachments
on the fake Discord."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq.job import Job

from core.jobs import job_id_for_interaction
from tests.support.fake_discord import slash_command
from tests.support.stack import wait_for


@pytest.fixture(scope="module")
def stack(env, fake_discord, processes):
    processes.worker(env)
    processes.bot(env)
    return fake_discord


def command(fake, name: str, **options):
    payload = slash_command(name, options)
    fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def reply(fake, payload, timeout: float = 10):
    return wait_for(lambda: fake.messages("callback", payload["token"]), timeout, what="interaction reply")[0]


def results(fake, payload) -> list:
    """Edits of the command's message that carry the result (an embed); progress edits do not."""
    return [p for p in fake.messages("edit", payload["token"]) if p.payload.get("embeds")]


def result(fake, payload, timeout: float = 60):
    return wait_for(lambda: results(fake, payload), timeout, what="result post")[0]


def decode(post) -> list[np.ndarray]:
    """The individual images (the grid of a multi-image result left out)."""
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for name, data in post.files if not name.endswith("-grid.png")]


def fields(post) -> dict[str, str]:
    return {f["name"]: f["value"] for f in post.payload["embeds"][0]["fields"]}


def test_commands_are_synced(stack):
    names = {c["name"] for c in stack.synced_commands}
    assert {"imagine", "models"} <= names


def test_imagine_posts_images_with_seeds_and_latency(stack):
    payload = command(stack, "imagine", prompt="an orange cat staring off", seed=1234, count=2)
    answer = reply(stack, payload)
    assert answer.payload["type"] == 4
    assert "Queued 2 images on **tiny**" in answer.payload["data"]["content"]
    assert "position **#1**" in answer.payload["data"]["content"]

    post = result(stack, payload)
    embed_fields = fields(post)
    assert embed_fields["Seeds"] == "1234, 1235"
    assert embed_fields["Model"] == "tiny" and embed_fields["Steps"] == "2"
    assert embed_fields["Size"] == "64×64"
    latency = embed_fields["Latency"]
    assert "queue" in latency and "inference" in latency and "total" in latency
    assert [name for name, _ in post.files] == ["imagine-tiny-1234.png", "imagine-tiny-1235.png",
                                                "imagine-tiny-grid.png"]
    assert post.message_id == "@original", "the result replaces the queued message"
    images = decode(post)
    assert all(image.shape == (64, 64, 3) for image in images)
    assert all(image.std() > 1.0 for image in images), "blank image"
    assert not np.array_equal(images[0], images[1]), "different seeds gave the same image"
    # The user is mentioned so they see their result among others.
    assert f"<@{payload['member']['user']['id']}>" in post.payload["content"]


def test_same_seed_same_pixels(stack):
    first = command(stack, "imagine", prompt="a lighthouse at dusk", seed=42)
    second = command(stack, "imagine", prompt="a lighthouse at dusk", seed=42)
    a, b = decode(result(stack, first))[0], decode(result(stack, second))[0]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("options, message", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "x" * 600}, "limit is 500"),
    ({"prompt": "cat", "steps": 500}, "`steps` must be between 1 and 50"),
    ({"prompt": "cat", "guidance": -1.0}, "`guidance` must be between"),
    ({"prompt": "cat", "count": 9}, "`count` must be between 1 and 4"),
    ({"prompt": "cat", "size": 100}, "multiple of 64"),
    ({"prompt": "cat", "model": "dall-e"}, "Unknown model `dall-e`"),
])
def test_bad_options_get_ephemeral_error_and_no_job(stack, redis_server, options, message):
    payload = command(stack, "imagine", **options)
    answer = reply(stack, payload)
    assert answer.payload["data"]["flags"] & 64, "error must be ephemeral"
    assert message in answer.payload["data"]["content"]
    job_id = job_id_for_interaction(int(payload["id"]))
    assert not Job.exists(job_id, connection=Redis.from_url(redis_server.url))


def test_replayed_interaction_makes_one_job(stack, processes):
    payload = command(stack, "imagine", prompt="a single replayed command", seed=7)
    stack.dispatch("INTERACTION_CREATE", payload)  # the gateway replays it
    result(stack, payload)
    # The bot has seen the replay and refused it (a second job would have been queued instead).
    wait_for(lambda: f"interaction {payload['id']} replayed" in processes["bot"].log(), 10, what="replay refused")
    assert len(results(stack, payload)) == 1
    assert not stack.messages("followup", payload["token"])
    assert len(stack.messages("callback", payload["token"])) == 1


def test_models_lists_catalog_with_live_worker(stack):
    payload = command(stack, "models")
    answer = reply(stack, payload)
    description = answer.payload["data"]["embeds"][0]["description"]
    assert "**tiny** — 64px, 2 steps · 🟢 loaded · 0 waiting" in description
    assert "**sdxl-base** — 1024px" in description and "⚪ no worker" in description


def test_imagine_quality_fast_runs_the_lcm_lora_and_info_names_it(stack):
    payload = command(stack, "imagine", prompt="a lighthouse at dusk", seed=42, quality="fast")
    post = result(stack, payload)
    embed = post.payload["embeds"][0]
    assert fields(post)["Steps"] == "2 (fast)" and fields(post)["Guidance"] == "1"
    assert "LCMScheduler" in embed["footer"]["text"] and "fast-lora" in embed["footer"]["text"]
    standard = command(stack, "imagine", prompt="a lighthouse at dusk", seed=42)
    assert not np.array_equal(decode(post)[0], decode(result(stack, standard))[0])
    again = command(stack, "imagine", prompt="a lighthouse at dusk", seed=42, quality="fast")
    assert np.array_equal(decode(post)[0], decode(result(stack, again))[0]), "fast seeds reproduce"


def settings_command(fake, sub: str, user_id: str, **options):
    payload = slash_command("settings", {}, user_id=user_id)
    type_of = {str: 3, int: 4, bool: 5, float: 10}
    payload["data"]["options"] = [{"name": sub, "type": 1, "options": [
        {"name": k, "type": type_of[type(v)], "value": v} for k, v in options.items()]}]
    fake.dispatch("INTERACTION_CREATE", payload)
    return reply(fake, payload).payload["data"]


def test_settings_set_show_reset_and_apply_to_imagine(stack):
    user = "820000000000000077"
    saved = settings_command(stack, "set", user, quality="fast", spoiler=True)
    assert "Saved" in saved["content"] and "**quality**: fast" in saved["content"] and saved["flags"] & 64
    assert "**spoiler**: yes" in settings_command(stack, "show", user)["content"]
    payload = slash_command("imagine", {"prompt": "a red fox", "seed": 7}, user_id=user)
    stack.dispatch("INTERACTION_CREATE", payload)
    post = result(stack, payload)
    assert fields(post)["Steps"] == "2 (fast)"
    assert all(name.startswith("SPOILER_") for name, _ in post.files)
    assert "cleared" in settings_command(stack, "reset", user)["content"]
    assert "no saved defaults" in settings_command(stack, "show", user)["content"]
