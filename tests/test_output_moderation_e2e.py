"""Output moderation the whole way: a real worker whose (tiny, random) classifier flags every
image — the threshold is below any score — and a real bot, through the fake Discord: the server's
setting decides spoiler / withheld / shown, age-restricted channels have their own, buttons and
ℹ Info keep what was withheld out of reach."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import job_id_for_interaction
from tests.support.fake_discord import component_interaction, slash_command, subcommand
from tests.support.stack import ROOT, wait_for

ADMIN_PERMISSIONS = str(1 << 5)
MEMBER_PERMISSIONS = "2048"
ADMIN_ID, MEMBER_ID = "830000000000000011", "830000000000000012"
PREFIX = "outmod"
_guilds = itertools.count(870000000000000001)


@pytest.fixture(scope="module")
def stack(env, fake_discord, processes):
    env = {**env, "IMAGINE_QUEUE_PREFIX": PREFIX, "IMAGINE_SAFETY_THRESHOLD": "-5"}  # flags everything
    processes.worker(env)
    processes.bot(env)
    return fake_discord


@pytest.fixture
def redis(redis_server) -> Redis:
    return Redis.from_url(redis_server.url)


@pytest.fixture
def guild() -> str:
    return str(next(_guilds))


def send(fake, payload) -> dict:
    return fake.answer(payload)


def imagine(fake, guild, *, nsfw=False, **options):
    payload = slash_command("imagine", options, guild_id=guild, user_id=MEMBER_ID,
                            permissions=MEMBER_PERMISSIONS, nsfw=nsfw)
    answer = send(fake, payload)
    assert "Queued" in answer["data"]["content"], answer
    return payload, wait_for(lambda: fake.results(payload["token"]), 60, what="result")[0]


def admin(fake, guild, **options) -> dict:
    return fake.answer(subcommand("imagine-admin", "nsfw", options, guild_id=guild, user_id=ADMIN_ID,
                                  permissions=ADMIN_PERMISSIONS))


def names(post) -> list[str]:
    return [name for name, _ in post.files]


def result_of(redis, payload) -> dict:
    job = Job.fetch(job_id_for_interaction(int(payload["id"])), connection=redis, serializer=JSONSerializer)
    return wait_for(job.return_value, 10, what="job result")


def test_default_is_spoiler_with_a_content_warning(stack, redis, guild):
    payload, post = imagine(stack, guild, prompt="a red barn", count=2, seed=5)
    assert names(post) and all(name.startswith("SPOILER_") for name in names(post)), names(post)
    assert "Content warning" in post.payload["content"]
    assert "image" not in (post.payload["embeds"][0].get("image") or {})  # embeds are never blurred
    # The scores are kept with the job for operators, not shown to the user.
    moderation = result_of(redis, payload)["moderation"]
    assert [v["flagged"] for v in moderation] == [True, True] and all(isinstance(v["score"], float) for v in moderation)
    assert "score" not in post.payload["content"].lower()


def test_block_withholds_and_tells_the_user_and_is_audited(stack, redis, guild):
    answer = admin(stack, guild, action="block")
    assert "✅ **nsfw**" in answer["data"]["content"]
    entry = json.loads(redis.lrange(f"{PREFIX}:policy:{guild}:audit", 0, 0)[0])
    assert (entry["action"], entry["old"], entry["new"], entry["actor_id"]) == ("nsfw", "spoiler", "block",
                                                                                 int(ADMIN_ID))
    payload, post = imagine(stack, guild, prompt="a red barn", count=2, seed=5)
    assert post.files == [] and "withheld" in post.payload["content"]
    fields = {f["name"]: f["value"] for f in post.payload["embeds"][0]["fields"]}
    assert fields["Seeds"] == "withheld, withheld"
    # Buttons keep the policy: a reroll is checked and withheld the same way.
    reroll = component_interaction(f"img:reroll:{job_id_for_interaction(int(payload['id']))}", post.message,
                                   guild_id=guild, user_id=MEMBER_ID)
    stack.dispatch("INTERACTION_CREATE", reroll)
    rerolled = wait_for(lambda: stack.results(reroll["token"]), 60, what="reroll result")[0]
    assert rerolled.files == [] and "withheld" in rerolled.payload["content"]
    # ℹ Info names the withheld images without their seeds.
    info = component_interaction(f"img:info:{job_id_for_interaction(int(payload['id']))}", post.message,
                                 guild_id=guild, user_id=MEMBER_ID)
    answer = send(stack, info)
    shown = {f["name"]: f["value"] for f in answer["data"]["embeds"][0]["fields"]}
    assert shown["Seeds"] == "image 1 withheld, image 2 withheld"


def test_age_restricted_channels_follow_their_own_setting(stack, guild):
    admin(stack, guild, action="block")  # elsewhere; age-restricted keeps its default, off
    _, post = imagine(stack, guild, prompt="a red barn", nsfw=True)
    assert names(post) and not any(name.startswith("SPOILER_") for name in names(post))
    admin(stack, guild, age_restricted="block")
    _, post = imagine(stack, guild, prompt="a red barn", nsfw=True)
    assert post.files == []


def test_users_can_ask_for_spoilers(stack, guild):
    admin(stack, guild, action="off", age_restricted="off")
    _, post = imagine(stack, guild, prompt="a red barn")
    assert names(post) and not any(name.startswith("SPOILER_") for name in names(post))
    _, post = imagine(stack, guild, prompt="a red barn", spoiler=True)
    assert names(post) and all(name.startswith("SPOILER_") for name in names(post))


@pytest.mark.e2e
def test_a_worker_whose_classifier_cannot_load_stops_with_one_line(env, tmp_path):
    bad = {**env, "IMAGINE_SAFETY_SOURCE": str(tmp_path / "missing"), "IMAGINE_QUEUE_PREFIX": "outmod-bad"}
    done = subprocess.run([sys.executable, "-m", "worker.main", "--burst"], env=bad, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot load the output classifier")
