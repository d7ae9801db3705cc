"""Moderation the whole way: admins change the policy with /imagine-admin through the fake
Discord gateway, real bot and worker processes apply it, Redis holds policy, audit and limits."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import job_id_for_interaction
from tests.support.fake_discord import slash_command, subcommand
from tests.support.stack import wait_for

ADMIN_PERMISSIONS = str(1 << 5)  # Manage Server only
MEMBER_PERMISSIONS = "2048"  # Send Messages
ADMIN_ID, MEMBER_ID = "830000000000000001", "830000000000000002"
CHANNEL = "810000000000000001"
_guilds = itertools.count(860000000000000001)


@pytest.fixture(scope="module")
def stack(env, fake_discord, processes):
    processes.worker(env)
    processes.bot(env)
    assert any(c["name"] == "imagine-admin" for c in fake_discord.synced_commands)
    return fake_discord


@pytest.fixture
def redis(redis_server) -> Redis:
    return Redis.from_url(redis_server.url)


@pytest.fixture
def guild() -> str:
    """A fresh server per test, so policies never leak between tests."""
    return str(next(_guilds))


def send(fake, payload) -> dict:
    return fake.answer(payload)


def imagine(fake, guild, *, user=MEMBER_ID, permissions=MEMBER_PERMISSIONS, channel=CHANNEL, **options):
    payload = slash_command("imagine", options, guild_id=guild, user_id=user, permissions=permissions,
                            channel_id=channel)
    return payload, send(fake, payload)


def admin(fake, guild, path: str, *, permissions=ADMIN_PERMISSIONS, user=ADMIN_ID, channel=CHANNEL,
          **options) -> dict:
    """``/imagine-admin <path…>`` with options."""
    return fake.answer(subcommand("imagine-admin", path, options, guild_id=guild, user_id=user,
                                  permissions=permissions, channel_id=channel))


def is_ephemeral(answer: dict) -> bool:
    return bool(answer["data"].get("flags", 0) & 64)


def job_exists(redis, payload) -> bool:
    return Job.exists(job_id_for_interaction(int(payload["id"])), connection=redis)


def queued(redis, payload) -> bool:
    """The job was enqueued: the answer goes out just before the enqueue, so wait a moment."""
    return bool(wait_for(lambda: job_exists(redis, payload), 5, what="enqueued"))


def fetch(redis, payload) -> Job:
    queued(redis, payload)
    return Job.fetch(job_id_for_interaction(int(payload["id"])), connection=redis, serializer=JSONSerializer)


def audit(redis, guild) -> list[dict]:
    return [json.loads(raw) for raw in redis.lrange(f"imagine:policy:{guild}:audit", 0, -1)]


def test_admin_group_is_synced_for_manage_server(stack):
    command = next(c for c in stack.synced_commands if c["name"] == "imagine-admin")
    assert str(command["default_member_permissions"]) == ADMIN_PERMISSIONS
    subcommands = {o["name"] for o in command["options"]}
    assert {"policy", "audit", "forced-negative", "banned", "models", "caps", "channels", "limits"} <= subcommands


@pytest.mark.parametrize("permissions", ["0", MEMBER_PERMISSIONS])
def test_member_without_manage_server_cannot_change_policy(stack, redis, guild, permissions):
    answer = admin(stack, guild, "banned add", term="cats", permissions=permissions, user=MEMBER_ID)
    assert is_ephemeral(answer) and "Manage Server" in answer["data"]["content"]
    answer = admin(stack, guild, "policy", permissions=permissions, user=MEMBER_ID)
    assert "Manage Server" in answer["data"]["content"]
    assert redis.get(f"imagine:policy:{guild}") is None and audit(redis, guild) == []
    payload, answer = imagine(stack, guild, prompt="cats on a sofa", model="sd-v1-4")
    assert not is_ephemeral(answer) and "Queued" in answer["data"]["content"]


def test_banned_term_blocks_member_with_reason_and_no_job(stack, redis, guild):
    answer = admin(stack, guild, "banned add", term="gore")
    assert is_ephemeral(answer) and "✅ **banned add**" in answer["data"]["content"]
    for options in ({"prompt": "a g.o r-e scene"}, {"prompt": "a cat", "negative_prompt": "ɡ 0 r е, blur"}):
        payload, answer = imagine(stack, guild, **options)
        assert is_ephemeral(answer)
        assert "server rule: banned terms" in answer["data"]["content"] and "gore" in answer["data"]["content"]
        assert not job_exists(redis, payload)
    assert [e["action"] for e in audit(redis, guild)] == ["banned add"]


def test_forced_negative_reaches_the_pipeline_and_the_embed(stack, redis, guild):
    admin(stack, guild, "forced-negative set", text="purple elephants")
    payload, answer = imagine(stack, guild, prompt="a red barn", negative_prompt="blurry", seed=3)
    assert "Queued" in answer["data"]["content"]
    assert fetch(redis, payload).args[0]["negative_prompt"] == "purple elephants, blurry"
    post = wait_for(lambda: stack.results(payload["token"]), 60, what="result")[0]
    fields = {f["name"]: f["value"] for f in post.payload["embeds"][0]["fields"]}
    assert fields["Negative prompt (server policy applied)"] == "purple elephants, blurry"
    # What the worker ran (its JobResult) and what it wrote into the PNG.
    result = wait_for(lambda: fetch(redis, payload).return_value(), 10, what="job result")
    assert (result["prompt"], result["negative_prompt"]) == ("a red barn", "purple elephants, blurry")
    png = Image.open(io.BytesIO(post.files[0][1]))
    assert png.text["negative_prompt"] == "purple elephants, blurry"
    # Without a user negative, the forced text joins the default.
    admin(stack, guild, "default-negative set", text="lowres")
    payload, _ = imagine(stack, guild, prompt="a red barn", model="sd-v1-4")
    assert fetch(redis, payload).args[0]["negative_prompt"] == "purple elephants, lowres"


def test_every_change_is_audited_and_shown(stack, redis, guild):
    admin(stack, guild, "forced-negative set", text="nsfw")
    admin(stack, guild, "forced-negative set", text="nsfw")  # no change: no entry
    admin(stack, guild, "forced-negative clear")
    admin(stack, guild, "caps", steps=10, mode="clamp")
    admin(stack, guild, "models deny", model="ssd-1b")
    entries = audit(redis, guild)
    assert [(e["action"], e["old"]) for e in entries] == [
        ("models deny", []), ("caps", {"max_steps": None, "clamp": False}),
        ("forced negative clear", "nsfw"), ("forced negative set", "")]
    assert [e["new"] for e in entries[1:]] == [{"max_steps": 10, "clamp": True}, "", "nsfw"]
    assert "ssd-1b" not in entries[0]["new"] and {"tiny", "sd-v1-4"} <= set(entries[0]["new"])
    assert all(e["actor_id"] == int(ADMIN_ID) and e["actor"] for e in entries)
    shown = admin(stack, guild, "audit")
    assert is_ephemeral(shown)
    lines = shown["data"]["content"].splitlines()
    assert len(lines) == 4 and "models deny" in lines[0] and "forced negative set" in lines[3]
    assert "`nsfw` → none" in lines[2]
    policy = admin(stack, guild, "policy")
    assert is_ephemeral(policy)
    fields = {f["name"]: f["value"] for f in policy["data"]["embeds"][0]["fields"]}
    assert "steps 10" in fields["Caps"] and "clamp" in fields["Caps"]
    assert "ssd-1b" not in fields["Models"]


def test_caps_reject_then_clamp(stack, redis, guild):
    admin(stack, guild, "caps", steps=2, count=1)
    payload, answer = imagine(stack, guild, prompt="a cat", steps=5, model="sd-v1-4")
    assert is_ephemeral(answer) and "server rule: max steps" in answer["data"]["content"]
    assert not job_exists(redis, payload)
    answer = admin(stack, guild, "caps", steps=60)
    assert "between 1 and 50" in answer["data"]["content"]  # a cap cannot exceed the global limit
    admin(stack, guild, "caps", mode="clamp")
    payload, answer = imagine(stack, guild, prompt="a cat", steps=5, count=3, model="sd-v1-4")
    assert "lowered to the server's cap of 2" in answer["data"]["content"]
    args = fetch(redis, payload).args[0]
    assert (args["steps"], args["count"]) == (2, 1)


def test_channel_allowlist(stack, redis, guild):
    elsewhere = "810000000000000077"
    admin(stack, guild, "channels allow")  # this channel
    payload, answer = imagine(stack, guild, prompt="a cat", channel=elsewhere, model="sd-v1-4")
    assert is_ephemeral(answer) and "server rule: channels" in answer["data"]["content"]
    assert f"<#{CHANNEL}>" in answer["data"]["content"] and not job_exists(redis, payload)
    payload, answer = imagine(stack, guild, prompt="a cat", model="sd-v1-4")
    assert queued(redis, payload)


def test_model_allowlist(stack, redis, guild):
    admin(stack, guild, "models allow", model="tiny")
    payload, answer = imagine(stack, guild, prompt="a cat", model="sd-v1-4")
    assert "server rule: models" in answer["data"]["content"] and not job_exists(redis, payload)


def test_model_autocomplete_offers_only_allowed_models(stack, guild):
    def suggestions() -> list[str]:
        # APPLICATION_COMMAND_AUTOCOMPLETE (type 4): the option being typed is marked focused.
        payload = slash_command("imagine", {"prompt": "a cat"}, guild_id=guild, user_id=MEMBER_ID,
                                permissions=MEMBER_PERMISSIONS, channel_id=CHANNEL)
        payload["type"] = 4
        payload["data"]["options"].append({"name": "model", "type": 3, "value": "", "focused": True})
        answer = send(stack, payload)
        assert answer["type"] == 8  # APPLICATION_COMMAND_AUTOCOMPLETE_RESULT
        return [choice["value"] for choice in answer["data"]["choices"]]

    assert {"tiny", "sd-v1-4", "sdxl-base"} <= set(suggestions())
    admin(stack, guild, "models allow", model="tiny")
    assert suggestions() == ["tiny"]


def test_max_active_jobs_per_user_admins_exempt(stack, redis, guild):
    admin(stack, guild, "limits", max_active=1)
    # sd-v1-4 has no worker in this stack, so its jobs stay queued (active).
    first, _ = imagine(stack, guild, prompt="a cat", model="sd-v1-4")
    second, answer = imagine(stack, guild, prompt="a dog", model="sd-v1-4")
    assert is_ephemeral(answer) and "server rule: max active jobs" in answer["data"]["content"]
    assert job_exists(redis, first) and not job_exists(redis, second)
    exempt, answer = imagine(stack, guild, prompt="a dog", model="sd-v1-4", user=ADMIN_ID,
                             permissions=ADMIN_PERMISSIONS)
    assert job_exists(redis, exempt)
    other, _ = imagine(stack, guild, prompt="a dog", model="sd-v1-4", user="830000000000000003")
    assert job_exists(redis, other)


def test_finished_job_frees_the_users_slot(stack, redis, guild):
    admin(stack, guild, "limits", max_active=1)
    first, _ = imagine(stack, guild, prompt="a cat", seed=1)
    wait_for(lambda: stack.results(first["token"]), 60, what="first result")
    # The worker's success callback released the slot.
    wait_for(lambda: not redis.zcard(f"imagine:active:{guild}:{MEMBER_ID}"), 10, what="slot released")
    second, answer = imagine(stack, guild, prompt="a dog", seed=2)
    assert "Queued" in answer["data"]["content"] and job_exists(redis, second)


def test_rate_limit(stack, redis, guild):
    admin(stack, guild, "limits", rate=2, window=3600)
    for prompt in ("one", "two"):
        payload, answer = imagine(stack, guild, prompt=prompt, model="sd-v1-4")
        assert queued(redis, payload)
    payload, answer = imagine(stack, guild, prompt="three", model="sd-v1-4")
    assert is_ephemeral(answer) and "server rule: rate limit" in answer["data"]["content"]
    assert not job_exists(redis, payload)


# -- edges: Discord's length limits, odd input, slots and buttons --------------------------------
def set_policy(redis, guild, **fields) -> None:
    from core.policy import GuildPolicy

    redis.set(f"imagine:policy:{guild}", GuildPolicy(**fields).model_dump_json())


def content(answer: dict) -> str:
    return answer["data"].get("content") or ""


def test_long_policies_and_inputs_get_answers_within_discords_limits(stack, redis, guild):
    """The fake answers 400 like Discord for a message over its limits; every answer here must
    go through and say what happened."""
    set_policy(redis, guild, banned_terms=tuple(f"forbiddenword{i:03d}xxxxxxxxxxxx" for i in range(40)),
               channels=tuple(810000000000001000 + i for i in range(100)))
    added = admin(stack, guild, "banned add", term="newterm")
    assert "banned add" in content(added) and "`newterm`" in content(added) and "41 now" in content(added)
    assert "newterm" in json.loads(redis.get(f"imagine:policy:{guild}"))["banned_terms"]
    _, refused = imagine(stack, guild, prompt="a cat", channel="810000000000000077")
    assert "server rule: channels" in content(refused) and "(and 90 more)" in content(refused)
    policy = admin(stack, guild, "policy")
    fields = {f["name"]: f["value"] for f in policy["data"]["embeds"][0]["fields"]}
    assert fields["Channels"].endswith("more)") and len(fields["Channels"]) <= 1024
    set_policy(redis, guild)
    _, unknown = imagine(stack, guild, prompt="a cat", model="x" * 2100)
    assert "Unknown model" in content(unknown) and is_ephemeral(unknown)
    assert stack.messages("rejected") == []


@pytest.mark.parametrize("job", ["x" * 2100, "a b", "   "])
def test_cancel_answers_odd_job_ids_plainly(stack, guild, job):
    payload = slash_command("cancel", {"job": job}, guild_id=guild, user_id=MEMBER_ID,
                            permissions=MEMBER_PERMISSIONS, channel_id=CHANNEL)
    answer = content(send(stack, payload))
    assert answer.startswith("❌") and "went wrong" not in answer
    assert stack.messages("rejected", payload["token"]) == []


def test_cancelling_frees_the_users_slot(stack, redis, guild):
    admin(stack, guild, "limits", max_active=1)
    _, first = imagine(stack, guild, prompt="a cat", model="sd-v1-4")  # no worker serves it: it waits
    assert "Queued" in content(first)
    _, blocked = imagine(stack, guild, prompt="a dog", model="sd-v1-4")
    assert "max active jobs" in content(blocked)
    cancelled = send(stack, slash_command("cancel", {}, guild_id=guild, user_id=MEMBER_ID,
                                          permissions=MEMBER_PERMISSIONS, channel_id=CHANNEL))
    assert "Cancelled 1" in content(cancelled)
    _, again = imagine(stack, guild, prompt="a dog", model="sd-v1-4")
    assert "Queued" in content(again)


def click(fake, guild, custom_id: str, message: dict) -> tuple[dict, dict]:
    from tests.support.fake_discord import component_interaction

    message = {**message, "components": [{"type": 1, "components": [
        {"type": 2, "style": 2, "label": "x", "custom_id": custom_id}]}]}
    payload = component_interaction(custom_id, message, user_id=MEMBER_ID, guild_id=guild, channel_id=CHANNEL)
    return payload, send(fake, payload)


@pytest.mark.parametrize("seed", [7, 2**32 - 1])
def test_variations_fit_the_servers_count_cap_and_the_seed_range(stack, redis, guild, seed):
    admin(stack, guild, "caps", count=2)  # reject mode: an explicit count over 2 is refused
    payload, answer = imagine(stack, guild, prompt="a cat", model="sd-v1-4", seed=seed)
    assert "Queued" in content(answer)
    message = stack.messages("callback", payload["token"])[0].message
    clicked, varied = click(stack, guild, f"img:vary:{job_id_for_interaction(int(payload['id']))}", message)
    assert "Queued 2 images" in content(varied), content(varied)
    request = fetch(redis, clicked).args[0]
    assert (request["count"], request["seed"]) == (2, (seed + 1) % 2**32)


def test_admin_model_autocomplete_offers_models_not_yet_allowed(stack, guild):
    admin(stack, guild, "models allow", model="tiny")
    payload = slash_command("imagine-admin", {}, guild_id=guild, user_id=ADMIN_ID,
                            permissions=ADMIN_PERMISSIONS, channel_id=CHANNEL)
    payload["type"] = 4  # autocomplete
    payload["data"]["options"] = [{"name": "models", "type": 2, "options": [
        {"name": "allow", "type": 1, "options": [{"name": "model", "type": 3, "value": "", "focused": True}]}]}]
    choices = [c["value"] for c in send(stack, payload)["data"]["choices"]]
    assert {"tiny", "sd-v1-4", "sdxl-base"} <= set(choices)


def test_a_prompt_cannot_ping_everyone_or_roles(stack, guild):
    payload, answer = imagine(stack, guild, prompt="@everyone <@&123456789012345678> look", model="tiny", steps=2)
    assert "@everyone" in content(answer)  # shown as typed…
    assert answer["data"]["allowed_mentions"]["parse"] == []  # …but pings nobody
    result = wait_for(lambda: stack.results(payload["token"]), 60, what="result")[0]
    mentions = result.payload["allowed_mentions"]
    assert mentions["parse"] == [] and mentions.get("roles", []) == [] and [str(u) for u in mentions["users"]] == [MEMBER_ID]


def test_channel_mentions_always_fit_an_embed_field():
    from bot.policy_render import mentions

    for count in range(1, 101):
        shown = mentions(tuple(1234567890123456789 + i for i in range(count)), 1024)
        assert len(shown) <= 1024
        assert shown.count("<#") == count or shown.endswith("more)")
