"""Property-based tests through the real bot process and the local fake Discord: generated
`/imagine` options (within what Discord's API lets a client send: strings up to 6,000
characters, integers within ±2^53, finite doubles), generated button custom ids, generated admin
subcommand values. Every interaction gets exactly one answer; a refusal is one ephemeral line
with no traceback; what is queued obeys the server's policy. The fake Discord also fails the
session if any message broke Discord's limits. Long profile: HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import JobRequest, job_id_for_interaction
from core.matcher import find_banned
from tests.support.fake_discord import component_interaction, slash_command, subcommand
from tests.support.stack import wait_for

GUILD, CHANNEL, ADMIN = "870000000000000001", "810000000000000001", "830000000000000001"
SCRATCH_GUILD = "870000000000000002"  # the admin fuzz edits this one, never the policy under test
ADMIN_PERMISSIONS = str(1 << 5)
EPHEMERAL = 1 << 6
TERMS = ("nude", "gore*")
_users = itertools.count(880000000000000001)

DISCORD_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(["", " ", "n\u200bude", "ɴᴜᴅᴇ", "\u202egore", "a" * 6000, "😀" * 500, "x\n" * 100]),
)
DISCORD_INT = st.one_of(st.integers(-2**53, 2**53), st.sampled_from([0, -1, 1, 64, 2**32, 2**53]))
DISCORD_FLOAT = st.floats(allow_nan=False, allow_infinity=False)


@pytest.fixture(scope="module")
def bot(env, fake_discord, processes, redis_server):
    env = {**env, "IMAGINE_QUEUE_PREFIX": "fuzz"}
    processes.bot(env)
    for path, options in ((["banned", "add"], {"term": "nude"}), (["banned", "add"], {"term": "gore*"}),
                          (["forced-negative", "set"], {"text": "gore"}), (["caps"], {"steps": 20, "count": 2})):
        answer(fake_discord, admin_payload(path, options))
    return fake_discord


def admin_payload(path: list[str], options: dict, guild: str = GUILD) -> dict:
    return subcommand("imagine-admin", " ".join(path), options, guild_id=guild, user_id=ADMIN,
                      permissions=ADMIN_PERMISSIONS, channel_id=CHANNEL)


def answer(fake, payload) -> dict:
    return fake.answer(payload, timeout=15)


def assert_clear_refusal_or_answer(reply: dict) -> str:
    data = reply.get("data") or {}
    content = data.get("content") or ""
    assert "Traceback" not in content and "Error:" not in content
    assert content, reply
    if data.get("flags", 0) & EPHEMERAL and content.startswith(("❌", "⏳", "⚠")):  # a refusal
        assert "\n" not in content.strip(), content
    return content


@given(prompt=DISCORD_TEXT, negative=st.one_of(st.none(), DISCORD_TEXT),
       model=st.one_of(st.none(), st.sampled_from(["tiny", "TINY ", "bk-sdm-small", "nope"]), st.text(max_size=40)),
       steps=st.one_of(st.none(), DISCORD_INT), guidance=st.one_of(st.none(), DISCORD_FLOAT),
       seed=st.one_of(st.none(), DISCORD_INT), size=st.one_of(st.none(), DISCORD_INT),
       count=st.one_of(st.none(), DISCORD_INT))
def test_imagine_answers_once_and_queues_only_what_the_policy_allows(bot, redis_server, prompt, negative, model,
                                                                      steps, guidance, seed, size, count):
    options = {k: v for k, v in dict(prompt=prompt, negative_prompt=negative, model=model, steps=steps,
                                     guidance=guidance, seed=seed, size=size, count=count).items() if v is not None}
    payload = slash_command("imagine", options, guild_id=GUILD, user_id=str(next(_users)), channel_id=CHANNEL,
                            permissions="2048")
    reply = answer(bot, payload)
    content = assert_clear_refusal_or_answer(reply)
    assert len(bot.messages("callback", payload["token"])) == 1
    if reply["data"].get("flags", 0) & EPHEMERAL:
        return
    assert content.startswith(("Queued", "🎨", "⏳")) or "Queued" in content
    job_id, redis = job_id_for_interaction(int(payload["id"])), Redis.from_url(redis_server.url)
    wait_for(lambda: Job.exists(job_id, connection=redis), 5, what="enqueued")  # just after the answer
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    request = JobRequest.model_validate(job.args[0])
    assert find_banned(request.prompt, TERMS) is None
    assert request.steps <= 20 and request.count <= 2 and request.guidance >= 2
    assert request.negative_prompt.startswith("gore")
    job.cancel()


@given(custom_id=st.one_of(st.from_regex(r"img:(reroll|vary|info|delete|model|cancel):[ -~]{0,90}", fullmatch=True),
                          st.from_regex(r"img:[a-z]{1,8}:ix-[0-9]{1,25}", fullmatch=True)))
def test_a_forged_button_gets_at_most_one_clear_answer(bot, custom_id):
    """Custom ids come from the client. One that matches no component is ignored by discord.py;
    one that matches names a job that is not there (or not theirs) and gets one clear answer."""
    payload = component_interaction(custom_id, {"id": "1", "components": []}, guild_id=GUILD, channel_id=CHANNEL)
    bot.dispatch("INTERACTION_CREATE", payload)
    answer(bot, slash_command("queue", {}, guild_id=GUILD, channel_id=CHANNEL))  # handled after it
    replies = bot.messages("callback", payload["token"])
    assert len(replies) <= 1
    for reply in replies:  # acknowledged first (a cancel): its followup is the answer
        assert_clear_refusal_or_answer(bot.reply(payload) if reply.payload.get("type") == 5 else reply.payload)


@given(term=DISCORD_TEXT, text=DISCORD_TEXT, number=DISCORD_INT,
       path=st.sampled_from([["banned", "add"], ["banned", "remove"], ["default-negative", "set"],
                             ["models", "allow"], ["caps"], ["limits"]]))
def test_admin_subcommands_answer_in_one_ephemeral_line(bot, term, text, number, path):
    values = {("banned", "add"): {"term": term}, ("banned", "remove"): {"term": term},
              ("default-negative", "set"): {"text": text}, ("models", "allow"): {"model": term},
              ("caps",): {"size": number}, ("limits",): {"rate": number}}[tuple(path)]
    reply = answer(bot, admin_payload(path, values, SCRATCH_GUILD))
    assert reply["data"].get("flags", 0) & EPHEMERAL
    assert_clear_refusal_or_answer(reply)


@given(model=st.one_of(st.none(), DISCORD_TEXT), negative=st.one_of(st.none(), DISCORD_TEXT),
       steps=st.one_of(st.none(), DISCORD_INT), guidance=st.one_of(st.none(), DISCORD_FLOAT),
       quality=st.one_of(st.none(), st.sampled_from(["fast", "standard"])), spoiler=st.one_of(st.none(), st.booleans()))
def test_settings_set_answers_in_one_ephemeral_line_and_imagine_still_obeys_the_policy(
        bot, redis_server, model, negative, steps, guidance, quality, spoiler):
    """A user's saved defaults are user input too: whatever they save, their next /imagine in a
    moderated server is still refused clearly or queued within the server's policy."""
    user = str(next(_users))
    options = {k: v for k, v in dict(model=model, negative_prompt=negative, steps=steps, guidance=guidance,
                                     quality=quality, spoiler=spoiler).items() if v is not None}
    payload = slash_command("settings", {}, guild_id=GUILD, user_id=user, channel_id=CHANNEL, permissions="2048")
    payload["data"]["options"] = [{"name": "set", "type": 1, "options": [
        {"name": k, "type": {str: 3, int: 4, bool: 5, float: 10}[type(v)], "value": v} for k, v in options.items()]}]
    reply = answer(bot, payload)
    assert reply["data"].get("flags", 0) & EPHEMERAL
    assert_clear_refusal_or_answer(reply)
    imagine = slash_command("imagine", {"prompt": "a lighthouse"}, guild_id=GUILD, user_id=user, channel_id=CHANNEL,
                            permissions="2048")
    reply = answer(bot, imagine)
    assert_clear_refusal_or_answer(reply)
    if reply["data"].get("flags", 0) & EPHEMERAL:
        return
    job_id, redis = job_id_for_interaction(int(imagine["id"])), Redis.from_url(redis_server.url)
    wait_for(lambda: Job.exists(job_id, connection=redis), 5, what="enqueued")  # just after the answer
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    request = JobRequest.model_validate(job.args[0])
    assert request.steps <= 20 and request.count <= 2 and request.guidance >= 2
    assert request.negative_prompt.startswith("gore")  # the server's forced part, first
    saved_part = request.negative_prompt.removeprefix("gore").removeprefix(", ")
    assert find_banned(saved_part, TERMS) is None  # a saved negative cannot smuggle terms in
    job.cancel()
