"""The rules of an admin's policy change (core.policy_edits): pure, no Redis, no Discord."""

from __future__ import annotations

import pytest

from core import policy_edits as edits
from core.policy import GuildPolicy
from core.validation import InvalidRequest
from settings.config import Settings

SETTINGS = Settings(_env_file=None, max_steps=50, max_count=4, max_size=1024, min_size=256)
CATALOG = ("bk-sdm-small", "sd-v1-4", "ssd-1b", "sdxl-base")


# -- what the store records --------------------------------------------------------------------
def test_changed_fields_are_only_the_differences_in_field_order():
    old = GuildPolicy(max_steps=20, banned_terms=("a",))
    new = GuildPolicy(max_steps=30, banned_terms=("a",), clamp=True, allowed_models=("sd-v1-4",))
    assert list(edits.changed_fields(old, new).items()) == [
        ("allowed_models", ("sd-v1-4",)), ("max_steps", 30), ("clamp", True)]
    assert edits.changed_fields(old, old) == {}


def test_edits_never_change_the_policy_they_are_given():
    policy = GuildPolicy(banned_terms=("cat",))
    edits.add_banned_term(policy, "dog")
    assert policy.banned_terms == ("cat",)


# -- negative prompts --------------------------------------------------------------------------
def test_negative_prompts_are_one_line_and_limited():
    policy = edits.set_forced_negative(GuildPolicy(), "  nsfw,\n  gore\t", 500)
    assert policy.forced_negative == "nsfw, gore"
    assert edits.set_forced_negative(GuildPolicy(), "x" * 10, 10).forced_negative == "x" * 10
    with pytest.raises(InvalidRequest, match="forced negative prompt is 11 characters; the limit is 10"):
        edits.set_forced_negative(GuildPolicy(), "x" * 11, 10)
    with pytest.raises(InvalidRequest, match="default negative prompt is 11 characters"):
        edits.set_default_negative(GuildPolicy(), "y" * 11, 10)
    assert edits.set_default_negative(GuildPolicy(), " lowres ", 10).default_negative == "lowres"


def test_clearing_negative_prompts():
    policy = GuildPolicy(forced_negative="nsfw", default_negative="lowres")
    assert edits.clear_forced_negative(policy).forced_negative == ""
    # None, not "": back to the operator's default ("" would mean "no default negative").
    assert edits.clear_default_negative(policy).default_negative is None
    assert edits.set_default_negative(GuildPolicy(), "   ", 10).default_negative == ""


# -- banned terms ------------------------------------------------------------------------------
def test_banned_terms_are_stored_cleaned_and_once():
    policy = edits.add_banned_term(GuildPolicy(), "  Bad   WORD ")
    assert policy.banned_terms == ("bad word",)
    for spelling in ("bad word", "BAD WORD", " bad\tword "):
        assert edits.add_banned_term(policy, spelling) == policy  # the same term: no change
    assert edits.add_banned_term(policy, "nud*").banned_terms == ("bad word", "nud*")


@pytest.mark.parametrize("term", ["", "   ", "***", "!?"])
def test_a_banned_term_needs_a_letter_or_digit(term):
    with pytest.raises(InvalidRequest, match="at least one letter or digit"):
        edits.add_banned_term(GuildPolicy(), term)


def test_banned_term_length_limit():
    assert edits.add_banned_term(GuildPolicy(), "a" * edits.MAX_TERM_CHARS).banned_terms == ("a" * 100,)
    with pytest.raises(InvalidRequest, match="at most 100 characters"):
        edits.add_banned_term(GuildPolicy(), "a" * (edits.MAX_TERM_CHARS + 1))


def test_banned_terms_cap():
    full = GuildPolicy(banned_terms=tuple(f"t{i}" for i in range(edits.MAX_TERMS)))
    with pytest.raises(InvalidRequest, match="At most 200 banned terms"):
        edits.add_banned_term(full, "one more")
    assert edits.add_banned_term(full, "T0") == full  # already there: no change, not refused
    almost = GuildPolicy(banned_terms=full.banned_terms[1:])
    assert len(edits.add_banned_term(almost, "last").banned_terms) == edits.MAX_TERMS


def test_removing_a_banned_term_in_any_spelling():
    policy = GuildPolicy(banned_terms=("bad word", "other"))
    assert edits.remove_banned_term(policy, "  BAD  word ").banned_terms == ("other",)
    assert edits.remove_banned_term(policy, "absent") == policy
    assert edits.remove_banned_term(policy, "bad") == policy  # whole terms only


# -- models ------------------------------------------------------------------------------------
def test_allowing_models():
    policy = edits.allow_model(GuildPolicy(), " SD-v1-4 ", CATALOG)
    assert policy.allowed_models == ("sd-v1-4",)  # from "all" to only this one
    assert edits.allow_model(policy, "sd-v1-4", CATALOG) == policy
    assert edits.allow_model(policy, "ssd-1b", CATALOG).allowed_models == ("sd-v1-4", "ssd-1b")
    with pytest.raises(InvalidRequest, match="Unknown model `nope`. Choose one of: bk-sdm-small, sd-v1-4"):
        edits.allow_model(policy, "Nope", CATALOG)


def test_denying_a_model_from_all_keeps_the_others_in_catalog_order():
    policy = edits.deny_model(GuildPolicy(), "sd-v1-4", CATALOG)
    assert policy.allowed_models == ("bk-sdm-small", "ssd-1b", "sdxl-base")
    assert edits.deny_model(policy, "sd-v1-4", CATALOG) == policy  # already denied


def test_the_last_allowed_model_cannot_be_denied():
    only = GuildPolicy(allowed_models=("ssd-1b",))
    with pytest.raises(InvalidRequest, match="At least one model must stay allowed"):
        edits.deny_model(only, "SSD-1B", CATALOG)
    with pytest.raises(InvalidRequest, match="At least one model"):
        edits.deny_model(GuildPolicy(), "x", ("x",))


def test_denying_the_default_model_resets_it_and_only_then():
    policy = GuildPolicy(allowed_models=("sd-v1-4", "ssd-1b"), default_model="ssd-1b")
    denied = edits.deny_model(policy, "ssd-1b", CATALOG)
    assert (denied.allowed_models, denied.default_model) == (("sd-v1-4",), None)
    assert edits.deny_model(policy, "sd-v1-4", CATALOG).default_model == "ssd-1b"


def test_default_model_must_be_allowed():
    assert edits.set_default_model(GuildPolicy(), " SDXL-base", CATALOG).default_model == "sdxl-base"
    limited = GuildPolicy(allowed_models=("sd-v1-4",))
    with pytest.raises(InvalidRequest, match=r"Allow `ssd-1b` first"):
        edits.set_default_model(limited, "ssd-1b", CATALOG)
    with pytest.raises(InvalidRequest, match="Unknown model"):
        edits.set_default_model(limited, "nope", CATALOG)
    assert edits.allow_all_models(limited).allowed_models == ()


# -- caps --------------------------------------------------------------------------------------
def test_caps_at_the_operators_limits():
    policy = edits.set_caps(GuildPolicy(), SETTINGS, steps=50, count=1, size=1024)
    assert (policy.max_steps, policy.max_count, policy.max_pixels) == (50, 1, 1024 * 1024)
    assert edits.set_caps(GuildPolicy(), SETTINGS, pixels=768 * 512).max_pixels == 768 * 512
    for name, kwargs in (("steps", {"steps": 51}), ("count", {"count": 5}), ("pixels", {"size": 1088}),
                         ("pixels", {"pixels": 1024 * 1024 + 1}),
                         ("steps", {"steps": -1})):
        with pytest.raises(InvalidRequest, match=f"The {name} cap must be between 1 and"):
            edits.set_caps(GuildPolicy(), SETTINGS, **kwargs)


def test_caps_none_keeps_zero_removes():
    policy = GuildPolicy(max_steps=20, max_count=2, max_size=512, clamp=True)  # a stored side cap loads as pixels
    assert policy.max_pixels == 512 * 512
    assert edits.set_caps(policy, SETTINGS) == policy
    removed = edits.set_caps(policy, SETTINGS, steps=0, count=0, size=0)
    assert (removed.max_steps, removed.max_count, removed.max_pixels, removed.clamp) == (None, None, None, True)
    assert edits.set_caps(policy, SETTINGS, clamp=False).clamp is False
    assert edits.set_caps(policy, SETTINGS, steps=30).max_count == 2


@pytest.mark.parametrize("size", [300, 192, 64])
def test_size_cap_is_a_multiple_of_64_and_at_least_the_minimum(size):
    with pytest.raises(InvalidRequest, match="multiple of 64, at least 256"):
        edits.set_caps(GuildPolicy(), SETTINGS, size=size)


def test_size_cap_at_the_minimum():
    assert edits.set_caps(GuildPolicy(), SETTINGS, size=256).max_pixels == 256 * 256
    with pytest.raises(InvalidRequest, match="pixel cap must be at least 65536"):
        edits.set_caps(GuildPolicy(), SETTINGS, pixels=200 * 200)


def test_image_input_switch():
    off = edits.set_image_input(GuildPolicy(), False)
    assert off.allow_image_input is False and edits.changed_fields(GuildPolicy(), off) == {"allow_image_input": False}
    assert edits.set_image_input(off, True) == GuildPolicy()


# -- per-user limits ---------------------------------------------------------------------------
def test_limits_none_keeps_zero_removes():
    policy = edits.set_limits(GuildPolicy(), max_active=2, rate=5, window_s=30)
    assert (policy.max_active_jobs, policy.rate_count, policy.rate_window_s) == (2, 5, 30)
    assert edits.set_limits(policy) == policy
    cleared = edits.set_limits(policy, max_active=0, rate=0)
    assert (cleared.max_active_jobs, cleared.rate_count, cleared.rate_window_s) == (None, None, 30)


def test_an_invalid_value_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="Invalid value"):
        edits.set_limits(GuildPolicy(), window_s=0)


# -- channels ----------------------------------------------------------------------------------
def test_channels():
    policy = edits.allow_channel(GuildPolicy(), 11)
    assert edits.allow_channel(policy, 11) == policy
    policy = edits.allow_channel(policy, 12)
    assert policy.channels == (11, 12)
    assert edits.remove_channel(policy, 11).channels == (12,)
    assert edits.remove_channel(policy, 99) == policy
    assert edits.allow_all_channels(policy).channels == ()


def test_channels_cap():
    full = GuildPolicy(channels=tuple(range(1, edits.MAX_CHANNELS + 1)))
    with pytest.raises(InvalidRequest, match="At most 100 channels; `channels clear`"):
        edits.allow_channel(full, 1000)
    assert edits.allow_channel(full, 1) == full
