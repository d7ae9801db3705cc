"""Job records (real Redis) and the options each result button asks for."""

from __future__ import annotations

from redis import Redis

from bot.buttons import model_switch_options, reroll_options, variation_options
from core.jobs import Delivery, JobRequest, Reproducibility
from core.records import JobRecord, RecordStore


def record(**options) -> JobRecord:
    request = JobRequest(job_id="ix-5", model="tiny", prompt="a fox", negative_prompt="blurry", steps=2,
                         guidance=7.5, seed=100, size=64, count=2,
                         delivery=Delivery(application_id=1, interaction_id=5, interaction_token="tok-secret",
                                           user_id=42, guild_id=7))
    return JobRecord(job_id="ix-5", user_id=42, guild_id=7, request=request,
                     options={"prompt": "a fox", "negative_prompt": "blurry", "model": None, "steps": None,
                              "guidance": None, "seed": 100, "size": None, "count": 2, **options})


def test_button_options():
    assert reroll_options(record()).seed is None and reroll_options(record()).count == 2
    varied = variation_options(record(), count=4)
    assert (varied.seed, varied.count, varied.prompt, varied.negative_prompt) == (102, 4, "a fox", "blurry")
    switched = model_switch_options(record(), "sdxl-base")
    assert (switched.model, switched.seed, switched.size, switched.steps) == ("sdxl-base", 100, None, None)
    assert model_switch_options(record(size=512), "sdxl-base").size == 512  # the user's own choice stays


def test_records_round_trip_without_the_token(redis_server):
    store = RecordStore(Redis.from_url(redis_server.url), prefix="unit-records", ttl_s=60)
    store.save(record())
    raw = store.redis.hgetall("unit-records:record:ix-5")
    assert b"tok-secret" not in b"".join(raw.values())
    assert 0 < store.redis.ttl("unit-records:record:ix-5") <= 60
    repro = Reproducibility(model="tiny", source="/m", pipeline="P", scheduler="S", diffusers_version="0.42.1",
                            seeds=[100, 101], steps=2, guidance=7.5, width=64, height=64, prompt="a fox")
    store.attach_result("ix-5", repro)
    loaded = store.load("ix-5")
    assert loaded.request.delivery is None and loaded.result == repro and loaded.options["seed"] == 100
    assert store.user_jobs(42) == ["ix-5"] and store.load("ix-missing") is None
    assert repro.png_text(101)["seed"] == "101" and repro.png_text(101)["guidance"] == "7.5"
    assert repro.png_text(101)["revision"] == ""
