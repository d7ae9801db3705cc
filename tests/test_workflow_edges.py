"""Image workflow (issue 14) and fast mode and per-user settings (issue 15) at their edges:
EXIF-rotated uploads, decompression bombs on the web, the largest seed, Remix's own settings,
a saved aspect ratio, settings told once; each names the issue sentence it holds the code to."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import pytest
from PIL import Image
from redis import Redis

from core.admission import Requester, admit
from core.attachments import inspect_image
from core.jobs import JobResult, Reproducibility, SourceImage, Timings
from core.policy import GuildPolicy, apply_policy
from core.policy_store import PolicyStore
from core.records import JobRecord
from core.user_settings import UserSettings, UserSettingsStore
from core.validation import MAX_SEED, ImagineOptions, InvalidRequest
from settings.catalog import build_catalog
from settings.config import Settings
from tests.support.fake_discord import snowflake

SETTINGS = Settings(_env_file=None)
CATALOG = build_catalog()
CDN = "https://cdn.discordapp.com/attachments/1/2/imagine-sd-v1-4-4294967296.png"


def exif_rotated_portrait(width: int = 300, height: int = 600) -> bytes:
    """A portrait photo as the user sees it (width < height), stored landscape with EXIF
    orientation 6 (rotate 90° clockwise to display), as phones write them."""
    seen = Image.new("RGB", (width, height), (200, 80, 40))
    stored = seen.transpose(Image.Transpose.ROTATE_90)  # height × width on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims ``width``×``height`` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + chunk(b"IEND", b""))


# -- issue 14: "EXIF-rotated photos (rotated as the user sees them)" + "The output keeps the
# input's aspect ratio" -----------------------------------------------------------------------
def test_an_uploads_facts_are_its_size_as_the_user_sees_it():
    facts = inspect_image(exif_rotated_portrait(), max_bytes=10**7, max_pixels=10**8)
    assert (facts.width, facts.height) == (300, 600)


@pytest.fixture
def web(redis_server):
    from web.jobs import WebJobs

    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=f"audit{snowflake()[-6:]}",
                        default_model="sd-v1-4")
    return WebJobs(Redis.from_url(redis_server.url), settings)


def test_a_web_upload_of_an_exif_rotated_portrait_makes_a_portrait(web):
    from web.app import options_from_form

    source = web.store_upload(exif_rotated_portrait())
    options = options_from_form("a cat", "", None, 20, 7.5, 5, 1, None, aspect="auto", strength=0.5, source=source)
    request, _, _ = web.submit(options, "192.0.2.7")
    web.discard_upload(source)
    assert request.height > request.width, (request.width, request.height)


# -- issue 14: a decompression bomb uploaded on the web gets "one clear line" -----------------------
@pytest.mark.parametrize("side", [20000, 100000])
def test_a_web_upload_that_is_a_decompression_bomb_is_told_so(side):
    with pytest.raises(InvalidRequest) as refused:
        inspect_image(png_claiming(side, side), max_bytes=10**7, max_pixels=40_000_000)
    message = str(refused.value)
    assert "not a PNG" not in message, message  # it is a PNG: one that claims far too many pixels
    assert "limit" in message or "pixels" in message, message


# -- issue 14: "Upscale ×2 button: a larger image of the same result" (every image of it) ------------
def _record_at_the_last_seed() -> JobRecord:
    options = ImagineOptions("a fox", model="sd-v1-4", seed=MAX_SEED, count=2)
    request = apply_policy(options, GuildPolicy(), job_id="audit-1", settings=SETTINGS, catalog=CATALOG).request
    repro = Reproducibility(model="sd-v1-4", source="m", pipeline="P", scheduler="S", diffusers_version="0",
                            seeds=request.seeds(), steps=request.steps, guidance=request.guidance,
                            width=request.width, height=request.height, prompt="a fox")
    return JobRecord(job_id="audit-1", user_id=1, options=dataclasses.asdict(options), request=request,
                     result=repro)


def test_upscale_works_on_every_image_of_a_job_made_at_the_largest_seed():
    from bot.buttons import upscale_options

    record = _record_at_the_last_seed()
    source = SourceImage(url=CDN, content_type="image/png", width=record.request.width,
                         height=record.request.height)
    for index in range(record.request.count):
        request = apply_policy(upscale_options(record, source, index), GuildPolicy(), job_id=f"u{index}",
                               settings=SETTINGS, catalog=CATALOG).request
        assert (request.mode, request.width) == ("upscale", 2 * record.request.width)


def test_web_upscale_works_on_every_image_of_a_job_made_at_the_largest_seed():
    from web.app import action_options, last_job

    record = _record_at_the_last_seed()
    seeds = record.request.seeds()
    result = JobResult(job_id="web-a", model="sd-v1-4", seeds=seeds, width=512, height=512,
                       timings=Timings(queue_wait_ms=1, inference_ms=1, total_ms=1),
                       image_keys=["p:images:web-a:0", "p:images:web-a:1"], reproducibility=record.result)
    last = last_job(ImagineOptions("a fox", model="sd-v1-4", seed=MAX_SEED, count=2),
                    type("R", (), {"model": "sd-v1-4"})(), result)
    for number in (1, 2):
        request = apply_policy(action_options(last, "upscale", number), GuildPolicy(), job_id=f"w{number}",
                               settings=SETTINGS, catalog=CATALOG).request
        assert (request.mode, request.width) == ("upscale", 1024)


# -- issue 14: "Remix ... submitting runs the same settings ... with the edited text" --------------
def test_remix_runs_the_jobs_own_settings_not_the_clickers_current_defaults():
    from bot.buttons import remix_options

    author = UserSettings(steps=12, guidance=4.0, spoiler=True)
    options = ImagineOptions("a red fox", model="sd-v1-4", seed=7)
    original = apply_policy(options, GuildPolicy(), job_id="o", settings=SETTINGS, catalog=CATALOG,
                            user=author).request
    record = JobRecord(job_id="o", user_id=1, options=dataclasses.asdict(options), request=original)
    # Someone else clicks Remix (or the author after changing /settings).
    clicker = UserSettings(steps=40, guidance=9.0, quality="fast")
    remix = apply_policy(remix_options(record, "a blue fox", ""), GuildPolicy(), job_id="r",
                         settings=SETTINGS, catalog=CATALOG, user=clicker).request
    assert remix.prompt == "a blue fox"
    same = ("steps", "guidance", "quality", "width", "height", "seed", "count", "model")
    assert {k: getattr(remix, k) for k in same} == {k: getattr(original, k) for k in same}


# -- issue 15: "/settings lets a user set their defaults: model, negative prompt, aspect ratio, ..." --
def test_a_saved_aspect_ratio_applies_to_imagine():
    saved = UserSettings.model_validate({"aspect": "16:9"})
    request = apply_policy(ImagineOptions("a cat", model="sd-v1-4"), GuildPolicy(), job_id="j",
                           settings=SETTINGS, catalog=CATALOG, user=saved).request
    assert request.width > request.height, (request.width, request.height)


def test_the_settings_command_takes_an_aspect_ratio():
    from bot.commands.settings import set_

    assert "aspect" in {parameter.name for parameter in set_.parameters}


# -- issue 15: "a default the server forbids is replaced by the server's, and the user is told once" --
def test_a_saved_guidance_the_server_raises_is_told_once(redis_server):
    redis = Redis.from_url(redis_server.url)
    prefix = f"auditg{snowflake()[-6:]}"
    store, policies = UserSettingsStore(redis, prefix), PolicyStore(redis, prefix)
    store.save(42, UserSettings(guidance=1.0))
    redis.set(policies.policy_key(7), GuildPolicy(forced_negative="gore").model_dump_json())

    def notes(job_id: str) -> tuple[str, ...]:
        admitted = admit(ImagineOptions("a cat"), Requester(user_id=42, guild_id=7, channel_id=None, exempt=True),
                         job_id=job_id, settings=SETTINGS, catalog=CATALOG, policies=policies,
                         user_settings=store)
        assert admitted.moderated.request.guidance >= SETTINGS.forced_negative_min_guidance
        return admitted.moderated.notes

    assert any("guidance" in note for note in notes("g1"))  # told the first time
    assert not any("guidance" in note for note in notes("g2")), "told again"


def test_an_attached_image_keeps_its_own_ratio_over_a_saved_aspect():
    saved = UserSettings(aspect="16:9")
    source = SourceImage(url=CDN, content_type="image/png", width=300, height=600)
    request = apply_policy(ImagineOptions("a cat", model="sd-v1-4", source=source), GuildPolicy(), job_id="j",
                           settings=SETTINGS, catalog=CATALOG, user=saved).request
    assert request.height > request.width, (request.width, request.height)
    typed = apply_policy(ImagineOptions("a cat", model="sd-v1-4", aspect="9:16"), GuildPolicy(), job_id="k",
                         settings=SETTINGS, catalog=CATALOG, user=saved).request
    assert typed.height > typed.width  # what the command says wins over the saved default


@pytest.mark.parametrize("spelling", ["16:9", "16x9", " 16 / 9 ", "16 by 9"])
def test_a_saved_aspect_is_checked_like_the_commands(spelling):
    from core.user_settings import check_settings

    saved = check_settings(UserSettings(aspect=spelling), SETTINGS, CATALOG)
    request = apply_policy(ImagineOptions("a cat", model="sdxl-base"), GuildPolicy(), job_id="j",
                           settings=SETTINGS, catalog=CATALOG, user=saved).request
    assert request.width > request.height


@pytest.mark.parametrize("bad", ["0:1", "10:1", "wide", "nan:1"])
def test_a_saved_aspect_out_of_limits_is_refused_when_saved(bad):
    from core.user_settings import check_settings

    with pytest.raises(InvalidRequest, match="aspect"):
        check_settings(UserSettings(aspect=bad), SETTINGS, CATALOG)


def test_a_saved_aspect_no_longer_usable_falls_back_to_square_and_says_so():
    saved = UserSettings(aspect="10:1")  # saved under other limits (never through check_settings now)
    moderated = apply_policy(ImagineOptions("a cat", model="sd-v1-4"), GuildPolicy(), job_id="j",
                             settings=SETTINGS, catalog=CATALOG, user=saved)
    assert moderated.request.width == moderated.request.height
    assert [rule for rule, _ in moderated.user_notes] == ["aspect"]


def test_the_settings_text_shows_the_saved_aspect():
    from bot.commands.settings import ASPECT_CHOICES, NO_ASPECT, settings_text

    assert "**aspect**: 16:9" in settings_text(UserSettings(aspect="16:9"))
    assert NO_ASPECT in {choice.value for choice in ASPECT_CHOICES}  # how a user clears it


@pytest.mark.parametrize("name", ["IMAGINE_SAFETY_THRESHOLD", "IMAGINE_MAX_GUIDANCE",
                                  "IMAGINE_FORCED_NEGATIVE_MIN_GUIDANCE"])
def test_no_setting_takes_nan(monkeypatch, name):
    from pydantic import ValidationError

    monkeypatch.setenv(name, "nan")
    with pytest.raises(ValidationError, match=name.removeprefix("IMAGINE_").lower()):
        Settings(_env_file=None)


def test_a_saved_default_over_a_limit_the_operator_lowered_is_replaced_and_told():
    lowered = Settings(_env_file=None, max_steps=30, max_guidance=10)
    saved = UserSettings(steps=50, guidance=15.0)
    moderated = apply_policy(ImagineOptions("a cat", model="sd-v1-4"), GuildPolicy(), job_id="j",
                             settings=lowered, catalog=CATALOG, user=saved)
    assert moderated.request.steps <= 30 and moderated.request.guidance <= 10
    assert {rule for rule, _ in moderated.user_notes} == {"steps:operator", "guidance:operator"}
    with pytest.raises(InvalidRequest, match="steps"):  # typed: refused as before
        apply_policy(ImagineOptions("a cat", model="sd-v1-4", steps=50), GuildPolicy(), job_id="k",
                     settings=lowered, catalog=CATALOG, user=saved)


@pytest.mark.parametrize("strength", [1e-9, 0.0, 0.049, 1.01])
def test_a_strength_outside_what_the_front_ends_offer_is_refused_in_core(strength):
    source = SourceImage(url=CDN, content_type="image/png", width=512, height=512)
    with pytest.raises(InvalidRequest, match="strength"):
        apply_policy(ImagineOptions("a cat", model="sd-v1-4", source=source, strength=strength), GuildPolicy(),
                     job_id="j", settings=SETTINGS, catalog=CATALOG)


def test_an_aspect_typed_with_a_full_width_colon_works():
    request = apply_policy(ImagineOptions("a cat", model="sd-v1-4", aspect="16：9"), GuildPolicy(), job_id="j",
                           settings=SETTINGS, catalog=CATALOG).request
    assert request.width > request.height
