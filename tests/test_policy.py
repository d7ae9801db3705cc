"""apply_policy, the pure part of moderation: every rule, with no Redis."""

from __future__ import annotations

import pytest

from core.policy import GuildPolicy, PolicyViolation, apply_policy
from core.validation import ImagineOptions, InvalidRequest
from settings.config import Settings

SETTINGS = Settings(_env_file=None, default_model="bk-sdm-small")
CATALOG = SETTINGS.catalog()


def run(policy: GuildPolicy, channel_id: int | None = 10, **options):
    return apply_policy(ImagineOptions(**{"prompt": "a cat", **options}), policy, job_id="j1",
                        settings=SETTINGS, catalog=CATALOG, channel_id=channel_id)


def test_no_policy_keeps_the_global_default_negative():
    request = run(GuildPolicy()).request
    assert request.negative_prompt == SETTINGS.default_negative_prompt
    assert not request.forced_negative_applied


def test_forced_negative_comes_first_and_keeps_the_users_own():
    request = run(GuildPolicy(forced_negative="nsfw, gore"), negative_prompt="blurry").request
    assert request.negative_prompt == "nsfw, gore, blurry"
    assert request.forced_negative_applied


def test_forced_negative_with_server_default():
    policy = GuildPolicy(forced_negative="nsfw", default_negative="lowres")
    assert run(policy).request.negative_prompt == "nsfw, lowres"
    assert run(policy, negative_prompt="   ").request.negative_prompt == "nsfw, lowres"
    assert run(GuildPolicy(default_negative="")).request.negative_prompt == ""


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_banned_term_names_the_rule(field):
    options = {"prompt": "a cat", field: "a G.0.R.E scene"}
    with pytest.raises(PolicyViolation) as caught:
        run(GuildPolicy(banned_terms=("gore",)), **options)
    assert caught.value.rule == "banned terms"
    assert "banned terms" in str(caught.value) and "gore" in str(caught.value)
    assert isinstance(caught.value, InvalidRequest)


@pytest.mark.parametrize("text", ["n    ude", "nu\t\t\t\tde", "a  g   o    r     e"])
def test_banned_terms_are_checked_on_the_text_as_queued(text):
    """Whitespace is collapsed before queueing; the check must see that text, not the raw one
    (four spaces are over the matcher's gap, one is not)."""
    with pytest.raises(PolicyViolation):
        run(GuildPolicy(banned_terms=("nud*", "gore")), prompt=text)
    with pytest.raises(PolicyViolation):
        run(GuildPolicy(banned_terms=("nud*", "gore")), prompt="a cat", negative_prompt=text)


def test_channel_allowlist():
    policy = GuildPolicy(channels=(10, 11))
    assert run(policy, channel_id=11).request
    with pytest.raises(PolicyViolation, match="server rule: channels"):
        run(policy, channel_id=12)


def test_models_allowlist_and_server_default():
    policy = GuildPolicy(allowed_models=("sd-v1-4",), default_model="sd-v1-4")
    assert run(policy).request.model == "sd-v1-4"
    with pytest.raises(PolicyViolation, match="server rule: models"):
        run(policy, model="ssd-1b")


def test_caps_reject_explicit_values():
    policy = GuildPolicy(max_steps=20, max_count=2, max_size=512)
    with pytest.raises(PolicyViolation, match="limited to 20 on this server.*max steps"):
        run(policy, steps=30)
    with pytest.raises(PolicyViolation, match="max count"):
        run(policy, count=3)
    with pytest.raises(PolicyViolation, match="max pixels"):
        run(policy, size=768)
    with pytest.raises(PolicyViolation, match="over this server's cap.*max pixels"):
        run(policy, aspect="16:9", model="ssd-1b")


def test_caps_lower_unset_defaults_silently():
    moderated = run(GuildPolicy(max_steps=20, max_size=256), model="ssd-1b")  # default 30 steps, 1024 px
    assert (moderated.request.steps, moderated.request.width, moderated.request.height) == (20, 256, 256)
    assert moderated.notes == ()


def test_caps_clamp_mode_clamps_and_says_so():
    moderated = run(GuildPolicy(max_steps=20, max_count=2, clamp=True), steps=45, count=4)
    assert (moderated.request.steps, moderated.request.count) == (20, 2)
    assert len(moderated.notes) == 2 and "steps" in moderated.notes[0]


def test_the_request_is_built_once_with_everything_it_carries():
    request = apply_policy(ImagineOptions(prompt="a cat"), GuildPolicy(forced_negative="gore"), job_id="j1",
                           settings=SETTINGS, catalog=CATALOG, created_at=5.0, store_images=True).request
    assert request.store_images and request.created_at == 5.0 and request.forced_negative_applied


def test_an_unknown_model_on_an_allowlisting_server_names_the_allowed_ones():
    with pytest.raises(PolicyViolation, match="Allowed: sd-v1-4"):
        run(GuildPolicy(allowed_models=("sd-v1-4",)), model="nope")


def test_channel_allowlists_concern_discord_channels_only():
    assert run(GuildPolicy(channels=(10,)), channel_id=None).request  # the web has no channel


def test_defaults_are_not_checked_for_banned_terms():
    """Only the user's own text can smuggle a term in; the server's default negative cannot."""
    policy = GuildPolicy(banned_terms=("lowres",), default_negative="lowres")
    assert run(policy).request.negative_prompt == "lowres"


def test_global_limits_still_apply():
    with pytest.raises(InvalidRequest, match="between 1 and 50"):
        run(GuildPolicy(), steps=99)


# A forced negative prompt is read only through classifier-free guidance (guidance > 1).
@pytest.mark.parametrize("guidance", [0, 0.5, 1, 1.0001, 1.5, 1.99])
def test_guidance_that_would_skip_a_forced_negative_is_refused(guidance):
    with pytest.raises(PolicyViolation, match=r"`guidance` of at least 2 .*forced negative prompt"):
        run(GuildPolicy(forced_negative="gore"), guidance=guidance)


@pytest.mark.parametrize("guidance", [0, 1, 1.5])
def test_a_clamping_server_raises_guidance_with_a_note(guidance):
    moderated = run(GuildPolicy(forced_negative="gore", clamp=True), guidance=guidance)
    assert moderated.request.guidance == 2.0 and moderated.request.forced_negative_applied
    assert moderated.notes == ("`guidance` raised to 2 so the server's negative prompt applies",)


def test_a_low_default_guidance_is_raised_silently_under_a_forced_negative():
    settings = Settings(_env_file=None, models={"bk-sdm-small": {"default_guidance": 1.0}})
    catalog = settings.catalog()
    moderated = apply_policy(ImagineOptions(prompt="a cat"), GuildPolicy(forced_negative="gore"),
                             job_id="j1", settings=settings, catalog=catalog)
    assert moderated.request.guidance == 2.0 and moderated.notes == ()


def test_guidance_at_the_floor_or_without_a_forced_negative_is_left_alone():
    assert run(GuildPolicy(forced_negative="gore"), guidance=2).request.guidance == 2
    assert run(GuildPolicy(default_negative="lowres"), guidance=0).request.guidance == 0
    assert run(GuildPolicy(), guidance=1).request.guidance == 1


def test_the_floor_is_an_operator_setting():
    settings = Settings(_env_file=None, forced_negative_min_guidance=4)
    moderated = apply_policy(ImagineOptions(prompt="a cat", guidance=3),
                             GuildPolicy(forced_negative="gore", clamp=True), job_id="j1",
                             settings=settings, catalog=settings.catalog())
    assert moderated.request.guidance == 4
