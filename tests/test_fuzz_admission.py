"""Property-based tests of the entry points that take user text and numbers, below the
transports: the admission pass every front end calls, the web form, the CLI and the custom ids
buttons carry. Fast profile in the default suite; the long one by hand:

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz_admission.py

Properties: no exception but a clear one-line refusal reaches a user, nothing admitted breaks
the server's policy, and what is admitted serializes for the queue.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.matcher import find_banned
from core.policy import GuildPolicy, apply_policy
from core.validation import ImagineOptions, InvalidRequest
from settings.config import Settings

SETTINGS = Settings(_env_file=None, default_model="bk-sdm-small")
CATALOG = SETTINGS.catalog()
TERMS = ("nude", "gore*", "blood bath")

# Text with the Unicode a hostile user reaches for: combining marks, bidi overrides, zero-width,
# emoji, look-alikes, lone surrogates (JSON can carry them), control characters, huge lengths.
NASTY = st.sampled_from(["\u0301", "\u202e", "\u200b", "\ufeff", "😀", "👨‍👩‍👧", "ɴ", "🅝", "\ud800",
                         "\udfff", "\x00", "\n", "\t", "ｎ", "ß", "İ", "\u0000nude", "n\u0336ude"])
TEXT = st.one_of(st.text(max_size=80), st.lists(st.one_of(NASTY, st.text(max_size=5)), max_size=30).map("".join),
                 st.sampled_from(["", " ", "x" * 501, "nude " * 200, "a" * 10_000]))
NUMBER = st.one_of(st.none(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**53, 10**400]))
MODEL = st.one_of(st.none(), st.sampled_from([*CATALOG, "BK-SDM-SMALL ", "", "nope", "sd-v1-4\x00"]), st.text(max_size=20))
POLICY = st.builds(
    GuildPolicy, forced_negative=st.sampled_from(["", "gore"]), banned_terms=st.just(TERMS),
    allowed_models=st.sampled_from([(), ("bk-sdm-small",)]), max_steps=st.sampled_from([None, 10]),
    max_count=st.sampled_from([None, 2]), max_size=st.sampled_from([None, 512]), clamp=st.booleans())


def one_clear_line(error: Exception) -> None:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text and len(text) < 2000


@given(prompt=TEXT, negative=st.one_of(st.none(), TEXT), model=MODEL, steps=NUMBER, guidance=NUMBER,
       seed=NUMBER, size=NUMBER, count=NUMBER, policy=POLICY)
def test_admission_refuses_clearly_or_admits_within_the_policy(prompt, negative, model, steps, guidance,
                                                               seed, size, count, policy):
    options = ImagineOptions(prompt=prompt, negative_prompt=negative, model=model, steps=steps,
                             guidance=guidance, seed=seed, size=size,
                             count=1 if count is None else count)
    try:
        moderated = apply_policy(options, policy, job_id="ix-1", settings=SETTINGS, catalog=CATALOG)
    except InvalidRequest as error:
        one_clear_line(error)
        return
    request = moderated.request
    assert find_banned(request.prompt, TERMS) is None
    assert not policy.allowed_models or request.model in policy.allowed_models
    assert policy.max_steps is None or request.steps <= policy.max_steps
    assert policy.max_count is None or request.count <= policy.max_count
    assert policy.max_pixels is None or request.width * request.height <= policy.max_pixels
    assert request.width * request.height <= SETTINGS.max_pixels
    assert 1 <= request.steps <= SETTINGS.max_steps and 1 <= request.count <= SETTINGS.max_count
    assert math.isfinite(request.guidance) and 0 <= request.guidance <= SETTINGS.max_guidance
    if policy.forced_negative:
        assert request.guidance >= SETTINGS.forced_negative_min_guidance
        assert request.negative_prompt.startswith(policy.forced_negative)
    json.dumps(request.model_dump(mode="json")).encode()  # what the queue stores


@given(steps=NUMBER, guidance=NUMBER, seed=NUMBER, count=NUMBER, size=st.one_of(NUMBER, st.just("")),
       prompt=TEXT)
def test_the_web_form_refuses_clearly(steps, guidance, seed, count, size, prompt):
    from web.app import options_from_form

    try:
        options = options_from_form(prompt, None, "bk-sdm-small", steps, guidance, seed, count, size)
    except InvalidRequest as error:
        one_clear_line(error)
        return
    try:
        apply_policy(options, GuildPolicy(), job_id="web-1", settings=SETTINGS, catalog=CATALOG)
    except InvalidRequest as error:
        one_clear_line(error)


@given(custom_id=st.one_of(st.text(max_size=120), st.from_regex(r"img:[a-z]{1,8}:[\w\-:]{0,90}", fullmatch=True)))
def test_button_custom_ids_parse_or_are_ignored(custom_id):
    """A component's custom id comes from the client: the templates accept only their own shape."""
    from core.texts import CANCEL_TEMPLATE, MODEL_TEMPLATE, RESULT_TEMPLATE

    for template in (CANCEL_TEMPLATE, MODEL_TEMPLATE, RESULT_TEMPLATE):
        match = re.fullmatch(template, custom_id)
        if match:
            job_id = match.groupdict().get("job_id", "")
            assert ":" not in job_id and len(job_id) <= 100


@pytest.mark.parametrize("argv", [
    ["--steps", "nan", "x"], ["--steps", "1e999", "x"], ["--seed", "-5", "x"], ["--size", "99999999999999999999", "x"],
    ["\ud800"], ["--model", "\x00", "x"], ["--count", "0", "x"], ["--guidance", "inf", "x"], [""], ["x" * 5000],
])
def test_the_cli_answers_bad_input_with_one_line(argv, tmp_path, capsys):
    from worker.cli import main

    try:
        code = main([*argv, "--out", str(tmp_path / "x.png")])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("field", ["steps", "guidance", "seed", "size", "count"])
@pytest.mark.parametrize("value", [10**400, -10**400, float("nan"), float("inf"), float("-inf"), 2**64])
def test_huge_and_non_finite_numbers_are_refused_in_one_line(field, value):
    options = ImagineOptions(prompt="a cat", **{field: value})
    with pytest.raises(InvalidRequest) as refused:
        apply_policy(options, GuildPolicy(clamp=True), job_id="ix-1", settings=SETTINGS, catalog=CATALOG)
    one_clear_line(refused.value)


# -- every admin subcommand's edit rule ------------------------------------------------------
ADMIN_NUMBER = st.one_of(st.none(), st.integers(-2**53, 2**53), st.sampled_from([0, 1, -1, 64, 65, 10**6]))


@given(policy=POLICY, text=TEXT, model=MODEL, number=ADMIN_NUMBER, other=ADMIN_NUMBER, third=ADMIN_NUMBER,
       clamp=st.one_of(st.none(), st.booleans()),
       edit=st.sampled_from(["forced", "default", "add_term", "remove_term", "allow", "deny", "default_model",
                             "caps", "limits", "channel", "unchannel"]))
def test_every_admin_edit_refuses_clearly_or_yields_a_valid_policy(policy, text, model, number, other, third,
                                                                   clamp, edit):
    from core import policy_edits as edits

    calls = {
        "forced": lambda: edits.set_forced_negative(policy, text, SETTINGS.max_prompt_chars),
        "default": lambda: edits.set_default_negative(policy, text, SETTINGS.max_prompt_chars),
        "add_term": lambda: edits.add_banned_term(policy, text),
        "remove_term": lambda: edits.remove_banned_term(policy, text),
        "allow": lambda: edits.allow_model(policy, model or "", list(CATALOG)),
        "deny": lambda: edits.deny_model(policy, model or "", list(CATALOG)),
        "default_model": lambda: edits.set_default_model(policy, model or "", list(CATALOG)),
        "caps": lambda: edits.set_caps(policy, SETTINGS, steps=number, count=other, size=third, clamp=clamp),
        "limits": lambda: edits.set_limits(policy, max_active=number, rate=other, window_s=third),
        "channel": lambda: edits.allow_channel(policy, abs(number or 1)),
        "unchannel": lambda: edits.remove_channel(policy, abs(number or 1)),
    }
    try:
        changed = calls[edit]()
    except InvalidRequest as error:
        one_clear_line(error)
        return
    GuildPolicy.model_validate(changed.model_dump())  # still a policy the store can load
    json.dumps(changed.model_dump(mode="json")).encode()
    assert not changed.allowed_models or set(changed.allowed_models) <= set(CATALOG)
