"""Issue 14 through Discord: aspect ratios, an attached image (img2img, downloaded by the worker
from the fake CDN, never by the bot), Vary (Subtle/Strong), Upscale ×2 and Remix on a result,
the server's image-input switch and pixel cap, and every bad attachment told in one line.
Real bot and worker processes against the fake Discord (tests/support/fake_discord.py)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re

import pytest
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from bot.buttons import DYNAMIC_ITEMS
from core.jobs import job_id_for_interaction
from core.texts import image_action_custom_id, remix_custom_id
from core.validation import UPSCALE_STRENGTH, VARY_STRENGTHS
from tests.support.fake_discord import (
    MANAGE_GUILD,
    component_interaction,
    modal_submit,
    slash_command,
    subcommand,
)
from tests.support.stack import wait_for

PREFIX = "imgflow"  # this module's own Redis keys
USER = "820000000000000001"
_guilds = itertools.count(870000000000000001)


class Stack:
    def __init__(self, fake, redis_url):
        self.fake = fake
        self.redis = Redis.from_url(redis_url)


@pytest.fixture(scope="module")
def stack(env, fake_discord, redis_server, processes):
    env = {**env, "IMAGINE_QUEUE_PREFIX": PREFIX}
    processes.worker(env)
    processes.bot(env)
    return Stack(fake_discord, redis_server.url)


# -- helpers ---------------------------------------------------------------------------------
def png(width: int, height: int, colour=(200, 80, 40)) -> bytes:
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 8):  # some structure, so img2img has something to keep
        image.paste((20, 20, 160), (x, 0, x + 4, height))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def imagine(stack, guild: str = "800000000000000001", attachment: dict | None = None, **options) -> dict:
    payload = slash_command("imagine", options, guild_id=guild,
                            attachments={"image": attachment} if attachment else None)
    stack.fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def reply(stack, payload, timeout: float = 10) -> dict:
    return wait_for(lambda: stack.fake.messages("callback", payload["token"]), timeout, what="reply")[0].payload


def result(stack, payload, timeout: float = 60):
    edits = lambda: [p for p in stack.fake.messages("edit", payload["token"]) if p.payload.get("embeds")]
    return wait_for(edits, timeout, what="result")[0]


def job_args(stack, payload) -> dict:
    job_id = job_id_for_interaction(int(payload["id"]))
    wait_for(lambda: Job.exists(job_id, connection=stack.redis), 5, what="enqueued")
    return Job.fetch(job_id, connection=stack.redis, serializer=JSONSerializer).args[0]


def no_job(stack, payload) -> bool:
    return not Job.exists(job_id_for_interaction(int(payload["id"])), connection=stack.redis)


def click(stack, custom_id: str, message: dict, **where) -> dict:
    payload = component_interaction(custom_id, message, **where)
    stack.fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def is_ephemeral(answer: dict) -> bool:
    return bool(answer["data"].get("flags", 0) & 64)


def images_of(post) -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)) for name, data in post.files if "-grid." not in name]


def admin(stack, guild: str, path: str, **options) -> dict:
    return stack.fake.answer(subcommand("imagine-admin", path, options, guild_id=guild,
                                        permissions=str(MANAGE_GUILD)))


@pytest.fixture(scope="module")
def base(stack):
    """One text-to-image result at 2:1 (two images) whose buttons the click tests use."""
    payload = imagine(stack, prompt="a red fox in the snow", negative_prompt="blurry", seed=500, count=2,
                      aspect="21:9")
    post = result(stack, payload)
    return payload, post


# -- aspect ratio ----------------------------------------------------------------------------
def test_aspect_ratio_becomes_width_and_height(stack, base):
    payload, post = base
    request = job_args(stack, payload)
    assert (request["width"], request["height"], request["mode"]) == (128, 64, "txt2img")
    assert all(image.size == (128, 64) for image in images_of(post))
    # Every component on the result is one the bot answers (matched by custom id, as after a restart).
    ids = [c["custom_id"] for row in post.message["components"] for c in row["components"]]
    job_id = request["job_id"]
    assert {image_action_custom_id(kind, job_id, index) for kind in ("subtle", "strong", "upscale")
            for index in (0, 1)} | {remix_custom_id(job_id)} <= set(ids)
    templates = [re.compile(item.__discord_ui_compiled_template__.pattern) for item in DYNAMIC_ITEMS]
    assert all(any(t.fullmatch(custom_id) for t in templates) for custom_id in ids)


# -- image input -----------------------------------------------------------------------------
def test_an_attached_image_is_fetched_by_the_worker_and_keeps_its_aspect(stack):
    data = png(256, 128)
    attachment = stack.fake.attachment("photo.png", data)
    payload = imagine(stack, attachment=attachment, prompt="the same scene at night", strength=0.5, seed=7)
    assert "Queued" in reply(stack, payload)["data"]["content"]
    request = job_args(stack, payload)
    assert request["mode"] == "img2img" and request["strength"] == 0.5
    assert request["source"]["url"] == attachment["url"] and (request["width"], request["height"]) == (128, 64)
    post = result(stack, payload)
    assert [image.size for image in images_of(post)] == [(128, 64)]
    fetches = stack.fake.cdn_fetches(attachment["url"])
    assert fetches and all(status == 200 and "python-requests" in agent for _, status, agent in fetches), \
        "only the worker downloads the attachment (the bot never does)"
    # The record, the PNG metadata and ℹ Info say how the image was made.
    text = images_of(post)[0].text
    assert (text["mode"], text["strength"], text["source_sha256"]) == ("img2img", "0.5",
                                                                      hashlib.sha256(data).hexdigest())
    info = reply(stack, click(stack, f"img:info:{request['job_id']}", post.message))
    fields = {f["name"]: f["value"] for f in info["data"]["embeds"][0]["fields"]}
    assert fields["Mode"] == "img2img · strength 0.5"
    assert hashlib.sha256(data).hexdigest() in fields["Source image (sha256)"]


def bad_attachments(fake) -> dict[str, tuple[dict, str]]:
    good = png(128, 128)
    elsewhere = fake.attachment("cat.png", good)
    elsewhere = {**elsewhere, "url": "https://example.com/attachments/1/2/cat.png",
                 "proxy_url": "https://example.com/attachments/1/2/cat.png"}
    return {
        "not an image": (fake.attachment("notes.pdf", b"%PDF-1.4 ...", "application/pdf"), "must be a PNG"),
        "claims a type it is not": (fake.attachment("fake.png", b"plain text, not a picture", "image/png"),
                                    "not a readable image"),
        "over the upload size": (fake.attachment("big.png", good, size=11 * 1024 * 1024), "the limit is 10.0 MiB"),
        "over the pixel limit": (fake.attachment("huge.png", good, width=10000, height=9000), "the limit is 40.00 MP"),
        "not on the CDN": (elsewhere, "not on Discord's CDN"),
    }


@pytest.mark.parametrize("case", ["not an image", "claims a type it is not", "over the upload size",
                                  "over the pixel limit", "not on the CDN"])
def test_a_bad_attachment_gets_one_ephemeral_line_and_no_job(stack, case):
    attachment, message = bad_attachments(stack.fake)[case]
    payload = imagine(stack, attachment=attachment, prompt="a cat")
    answer = reply(stack, payload)
    assert is_ephemeral(answer) and message in answer["data"]["content"]
    assert "\n" not in answer["data"]["content"].strip()
    assert no_job(stack, payload)
    assert len(stack.fake.messages(key=payload["token"])) == 1  # the answer, nothing else
    assert not stack.fake.cdn_fetches(attachment["url"])


@pytest.mark.parametrize("case, told", [
    ("expired", "expired"),
    ("animated", "animated"),
    ("claims a type it is not", "claims to be image/png but is a JPEG image"),
])
def test_what_only_the_bytes_show_is_told_once_by_the_worker(stack, case, told):
    buffer = io.BytesIO()
    if case == "animated":  # an animated GIF: Discord gives it a width and height like any image
        frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        attachment = stack.fake.attachment("spin.gif", buffer.getvalue(), "image/gif")
    elif case == "claims a type it is not":  # the client claims PNG; the bytes are a JPEG
        Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
        attachment = stack.fake.attachment("photo.png", buffer.getvalue(), "image/png")
    else:
        attachment = stack.fake.attachment("old.png", png(128, 128))
        stack.fake.expire_attachment(attachment["url"])
    payload = imagine(stack, attachment=attachment, prompt="a cat")
    assert "Queued" in reply(stack, payload)["data"]["content"]
    outcomes = wait_for(lambda: stack.fake.outcomes(payload["token"], USER), 30, what="failure told")
    wait_for(lambda: Job.fetch(job_id_for_interaction(int(payload["id"])), connection=stack.redis,
                               serializer=JSONSerializer).is_failed, 10, what="job failed")
    assert len(stack.fake.outcomes(payload["token"], USER)) == 1, "told once"
    assert told in (outcomes[0].payload.get("content") or "")


def test_a_server_can_forbid_image_input(stack):
    guild = str(next(_guilds))
    answer = admin(stack, guild, "image-input", allowed=False)
    assert "image input" in answer["data"]["content"] and "allowed → forbidden" in answer["data"]["content"]
    attachment = stack.fake.attachment("photo.png", png(128, 128))
    payload = imagine(stack, guild, attachment=attachment, prompt="a cat")
    answer = reply(stack, payload)
    assert is_ephemeral(answer) and "does not allow image input" in answer["data"]["content"]
    assert no_job(stack, payload) and not stack.fake.cdn_fetches(attachment["url"])
    audit = admin(stack, guild, "audit")["data"]["content"]
    assert "image input: allowed → forbidden" in audit
    policy = admin(stack, guild, "policy")["data"]["embeds"][0]["fields"]
    assert any(f["name"] == "Image input" and f["value"].startswith("forbidden") for f in policy)


# -- buttons on a result ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["subtle", "strong"])
def test_vary_runs_img2img_of_that_image_with_a_new_seed(stack, base, kind):
    payload, post = base
    index = 1
    clicked = click(stack, image_action_custom_id(kind, job_args(stack, payload)["job_id"], index), post.message)
    assert "Queued" in reply(stack, clicked)["data"]["content"]
    request = job_args(stack, clicked)
    attachment = next(a for a in post.message["attachments"] if a["filename"] == "imagine-tiny-501.png")
    assert (request["mode"], request["strength"]) == ("vary", VARY_STRENGTHS[kind])
    assert request["source"]["url"] == attachment["url"]
    assert (request["prompt"], request["model"], request["count"]) == ("a red fox in the snow", "tiny", 2)
    assert request["seed"] != 500 and (request["width"], request["height"]) == (128, 64)
    if kind == "strong":  # one of them the whole way through the worker
        assert [image.size for image in images_of(result(stack, clicked))] == [(128, 64)] * 2


def test_upscale_doubles_the_size_with_the_same_seed(stack, base):
    payload, post = base
    clicked = click(stack, image_action_custom_id("upscale", job_args(stack, payload)["job_id"], 0), post.message)
    assert "Queued" in reply(stack, clicked)["data"]["content"]
    request = job_args(stack, clicked)
    assert (request["mode"], request["strength"], request["seed"], request["count"]) == (
        "upscale", UPSCALE_STRENGTH, 500, 1)
    assert (request["width"], request["height"]) == (256, 128)
    assert "imagine-tiny-500.png" in request["source"]["url"]
    assert [image.size for image in images_of(result(stack, clicked))] == [(256, 128)]


def test_upscale_over_the_servers_pixel_cap_is_refused(stack, base):
    payload, post = base
    guild = str(next(_guilds))
    assert "default → 16,384 px (≈128×128)" in admin(stack, guild, "caps", pixels=128 * 128)["data"]["content"]
    clicked = click(stack, image_action_custom_id("upscale", job_args(stack, payload)["job_id"], 0), post.message,
                    guild_id=guild)
    answer = reply(stack, clicked)
    assert is_ephemeral(answer) and "over this server's cap" in answer["data"]["content"]
    assert no_job(stack, clicked)


def test_remix_opens_a_prefilled_form_and_runs_the_edited_text(stack, base):
    payload, post = base
    job_id = job_args(stack, payload)["job_id"]
    clicked = click(stack, remix_custom_id(job_id), post.message)
    modal = reply(stack, clicked)
    assert modal["type"] == 9, "a modal is the first answer (it cannot follow a deferral)"
    inputs = {c["component"]["custom_id"]: c["component"].get("value") for c in modal["data"]["components"]}
    assert inputs == {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}
    submitted = modal_submit(modal["data"], {"prompt": "a white fox in the snow"}, message=post.message)
    stack.fake.dispatch("INTERACTION_CREATE", submitted)
    assert "Queued" in reply(stack, submitted)["data"]["content"]
    request = job_args(stack, submitted)
    assert (request["prompt"], request["negative_prompt"], request["seed"], request["count"]) == (
        "a white fox in the snow", "blurry", 500, 2)
    assert (request["width"], request["height"], request["mode"]) == (128, 64, "txt2img")


def test_a_remix_form_counts_even_if_this_bot_process_never_opened_it(stack, base):
    """As after a bot restart, or on another bot process: the form names its job."""
    payload, post = base
    job_id = job_args(stack, payload)["job_id"]
    form = {"custom_id": f"img:remix-form:{job_id}", "components": [
        {"type": 18, "component": {"type": 4, "custom_id": "prompt", "value": "x"}},
        {"type": 18, "component": {"type": 4, "custom_id": "negative_prompt", "value": ""}}]}
    submitted = modal_submit(form, {"prompt": "a grey fox in the snow"}, message=post.message)
    stack.fake.dispatch("INTERACTION_CREATE", submitted)
    assert "Queued" in reply(stack, submitted)["data"]["content"]
    request = job_args(stack, submitted)
    assert (request["prompt"], request["seed"]) == ("a grey fox in the snow", 500)
    assert len(stack.fake.messages("callback", submitted["token"])) == 1


def test_remix_of_an_image_job_keeps_its_source(stack):
    attachment = stack.fake.attachment("photo.png", png(256, 128))
    payload = imagine(stack, attachment=attachment, prompt="a house", strength=0.4, seed=3)
    post = result(stack, payload)
    modal = reply(stack, click(stack, remix_custom_id(job_args(stack, payload)["job_id"]), post.message))
    submitted = modal_submit(modal["data"], {"prompt": "a castle"}, message=post.message)
    stack.fake.dispatch("INTERACTION_CREATE", submitted)
    request = job_args(stack, submitted)
    assert (request["prompt"], request["mode"], request["strength"]) == ("a castle", "img2img", 0.4)
    assert request["source"]["url"] == attachment["url"] and (request["width"], request["height"]) == (128, 64)


def test_options_are_recorded_as_json(stack, base):
    payload, _ = base
    raw = stack.redis.hget(f"{PREFIX}:record:{job_args(stack, payload)['job_id']}", "record")
    assert json.loads(raw)["options"]["aspect"] == "21:9"


# -- which image a click means (pure) --------------------------------------------------------
def test_a_click_takes_that_images_own_attachment_and_nothing_else():
    import types

    from bot.buttons import IMAGE_GONE, WITHHELD, image_source
    from core.jobs import JobRequest, Reproducibility
    from core.records import JobRecord
    from core.validation import InvalidRequest

    api = "https://discord.com/api/v10"
    request = JobRequest(job_id="ix-1", model="tiny", prompt="a fox", steps=2, guidance=7.5, seed=10,
                         width=128, height=64, count=3)
    repro = Reproducibility(model="tiny", source="m", pipeline="P", scheduler="S", diffusers_version="0",
                            seeds=[10, 11, 12], steps=2, guidance=7.5, width=128, height=64, prompt="a fox",
                            withheld=[2])
    record = JobRecord(job_id="ix-1", user_id=1, options={"prompt": "a fox"}, request=request, result=repro)

    def attachment(name, host="cdn.discordapp.com"):
        return types.SimpleNamespace(filename=name, url=f"https://{host}/attachments/1/2/{name}?ex=1&is=2&hm=3",
                                     content_type="image/png", size=100, width=128, height=64)

    on_message = [attachment("imagine-tiny-10.png"), attachment("SPOILER_imagine-tiny-11.png"),
                  attachment("imagine-tiny-grid.png")]
    assert image_source(on_message, record, 0, api).url.endswith("imagine-tiny-10.png?ex=1&is=2&hm=3")
    assert image_source(on_message, record, 1, api).filename == "SPOILER_imagine-tiny-11.png"
    for index, message in ((2, WITHHELD), (5, IMAGE_GONE)):
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            image_source(on_message, record, index, api)
    with pytest.raises(InvalidRequest, match=re.escape(IMAGE_GONE)):  # never a link off Discord's CDN
        image_source([attachment("imagine-tiny-10.png", host="example.com")], record, 0, api)


def test_admin_texts_name_pixels_and_image_input():
    from bot.policy_render import show_change

    assert show_change(True, False, "image input") == "allowed → forbidden"
    assert show_change(None, 1024 * 1024, "caps", "max_pixels") == "default → 1,048,576 px (≈1024×1024)"
    assert show_change({"max_size": 512, "clamp": False}, {"max_size": None, "clamp": True}) == \
        "max_size: 512×512 px → default; clamp: reject → clamp"


@pytest.mark.parametrize("url, api, hosts, allowed", [
    ("https://cdn.discordapp.com/attachments/1/2/a.png?ex=1&is=2&hm=3", "https://discord.com/api/v10", (), True),
    ("https://media.discordapp.net/attachments/1/2/a.png", "https://discord.com/api/v10", (), True),
    ("http://cdn.discordapp.com/attachments/1/2/a.png", "https://discord.com/api/v10", (), False),  # not https
    ("https://cdn.discordapp.com/avatars/1/2.png", "https://discord.com/api/v10", (), False),  # not an attachment
    ("https://user@cdn.discordapp.com/attachments/1/2/a.png", "https://discord.com/api/v10", (), False),
    ("https://cdn.discordapp.com.evil.example/attachments/1/2/a.png", "https://discord.com/api/v10", (), False),
    ("https://127.0.0.1:9/attachments/1/2/a.png", "https://discord.com/api/v10", (), False),
    ("http://127.0.0.1:9/attachments/1/2/a.png", "http://127.0.0.1:9/api/v10", (), True),  # a local Discord
    ("http://127.0.0.1:8/attachments/1/2/a.png", "http://127.0.0.1:9/api/v10", (), False),
    ("https://files.example/attachments/1/2/a.png", "https://discord.com/api/v10", ("files.example",), True),
    ("https://cdn.discordapp.com/attachments/1/2/a.png", "https://discord.com/api/v10", ("files.example",), False),
    ("", "https://discord.com/api/v10", (), False),
])
def test_only_attachment_links_of_the_configured_discord_are_fetched(url, api, hosts, allowed):
    from core.attachments import is_attachment_url

    assert is_attachment_url(url, api, hosts) is allowed
