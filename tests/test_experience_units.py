"""Unit tests of the experience pieces: fleet numbers, texts and custom ids, latent preview,
grid, job records (real Redis), the options each result button asks for."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis

from bot.buttons import ModelSwitch, ResultButton, CancelButton, model_switch_options, reroll_options, variation_options
from core.fleet import FleetStats, eta_seconds, format_duration, percentile, work_units
from core.jobs import Delivery, JobRequest, Reproducibility
from core.texts import (cancel_custom_id, model_custom_id, progress_bar, queued_text,
                               result_custom_id)
from core.records import JobRecord, RecordStore
from worker.images import grid
from worker.progress import SD_FACTORS, ProgressReporter, latent_preview


def job(steps: int, count: int, size: int) -> JobRequest:
    return JobRequest(job_id="w", model="m", prompt="p", steps=steps, guidance=7.5, seed=1, size=size, count=count)


def test_percentiles_and_eta():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile([7.0], 95)) == (50, 95, 7)
    # Two typical jobs ahead shared by two workers, then its own run.
    assert eta_seconds(position=3, p50_ms=2000, workers=2) == 4.0
    assert eta_seconds(position=1, p50_ms=2000, workers=2, own_ms=500) == 0.5
    assert work_units(job(steps=50, count=4, size=1024)) == 50 * 4 * 4 == 16 * work_units(job(25, 2, 512))
    assert (format_duration(0.2), format_duration(42.4), format_duration(125)) == ("1 s", "42 s", "2 min 05 s")


def test_fleet_stats_need_a_few_samples_and_keep_recent_ones(redis_server):
    stats = FleetStats(Redis.from_url(redis_server.url), prefix="unit-fleet", samples=5, min_samples=3)
    stats.redis.delete("unit-fleet:latency:m")
    stats.record("m", 1000)
    stats.record("m", 3000)
    assert stats.latency("m") is None and stats.eta("m", 1, 1) is None
    for ms in (2000, 9000, 9000, 9000, 9000):
        stats.record("m", ms)
    latency = stats.latency("m")
    assert (latency.samples, latency.p50_ms, latency.p95_ms) == (5, 9000, 9000)  # oldest two dropped
    assert stats.eta("m", position=2, workers=3) == 12.0 and stats.eta("m", 1, workers=0) is None


def test_eta_scales_the_jobs_own_run_with_its_steps_images_and_size(redis_server):
    stats = FleetStats(Redis.from_url(redis_server.url), prefix="unit-fleet-work", samples=10, min_samples=3)
    stats.redis.delete("unit-fleet-work:latency:m", "unit-fleet-work:unit-ms:m")
    for _ in range(3):  # typical jobs: 25 steps, one 512² image, 2 s each
        stats.record("m", 2000, 2000 / work_units(job(25, 1, 512)))
    typical = stats.eta("m", position=1, workers=1, units=work_units(job(25, 1, 512)))
    heavy = stats.eta("m", position=1, workers=1, units=work_units(job(50, 4, 512)))
    assert (typical, heavy) == (2.0, 16.0)
    # Behind three typical jobs on three workers: one typical job's wait, then its own run.
    assert stats.eta("m", position=4, workers=3, units=work_units(job(50, 4, 512))) == 2.0 + 16.0
    assert stats.eta("m", position=1, workers=1) == 2.0  # no units: a typical job's time


def test_texts():
    assert progress_bar(12, 25, width=6) == "▰▰▰▱▱▱ 12/25"
    assert progress_bar(25, 25, width=4) == "▰▰▰▰ 25/25"
    assert queued_text("tiny", "cat", 2, 3, None).startswith("🎨 Queued 2 images on **tiny** — position **#3** in its queue.")
    assert "· ETA ~7 s." in queued_text("tiny", "cat", 1, 1, 6.6)


@pytest.mark.parametrize("item, custom_id", [
    (ResultButton, result_custom_id("reroll", "ix-123")), (ResultButton, result_custom_id("delete", "ix-1")),
    (ModelSwitch, model_custom_id("ix-123")), (CancelButton, cancel_custom_id("ix-9")),
])
def test_custom_ids_match_only_their_dynamic_item(item, custom_id):
    items = (ResultButton, ModelSwitch, CancelButton)
    assert [i for i in items if i.__discord_ui_compiled_template__.fullmatch(custom_id)] == [item]
    assert len(custom_id) <= 100


def test_latent_preview_is_the_linear_projection():
    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 0] = 1.0  # only channel 0 → RGB = its factor row, mapped from [-1, 1] to 0..255
    image = Image.open(io.BytesIO(latent_preview(latents, xl=False, size=16)))
    expected = [round((f + 1) / 2 * 255) for f in SD_FACTORS[0]]
    assert image.size == (16, 16)
    assert np.abs(np.asarray(image)[8, 8].astype(int) - expected).max() <= 1


def test_grid_places_images_in_a_square():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    sheet = np.asarray(grid([Image.new("RGB", (4, 4), c) for c in colours]))
    assert sheet.shape == (8, 8, 3)
    assert [tuple(sheet[1, 1]), tuple(sheet[1, 5]), tuple(sheet[5, 1]), tuple(sheet[5, 5])] == \
        [*colours, (255, 255, 255)]


def test_progress_reporter_sends_latest_step_at_most_once_per_interval():
    sent: list[tuple[float, int]] = []
    reporter = ProgressReporter(lambda step, total, png: sent.append((time.monotonic(), step)), interval_s=0.2)
    for step in range(1, 51):
        reporter.on_step(step, 50, torch.zeros(1, 4, 2, 2))
        time.sleep(0.01)
    reporter.close()
    assert 2 <= len(sent) <= 4
    assert all(b[0] - a[0] >= 0.19 for a, b in zip(sent, sent[1:]))
    assert sent[0][1] == 1 and [s for _, s in sent] == sorted(s for _, s in sent)
    assert not [t for t in threading.enumerate() if t.name == "progress" and t.is_alive()]


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


def test_a_position_edit_in_flight_holds_the_result_back_and_a_final_job_gets_none(redis_server):
    from worker.progress import PositionEdits

    edits = PositionEdits(Redis.from_url(redis_server.url), f"pos{time.time_ns()}", lease_s=5)
    events: list[str] = []

    def slow_position_edit():
        with edits.position_edit("job") as allowed:
            assert allowed
            time.sleep(0.5)  # e.g. discord.py retrying a 5xx
            events.append("position edit sent")

    editor = threading.Thread(target=slow_position_edit)
    editor.start()
    time.sleep(0.1)
    edits.finalize("job")  # the result is about to be posted
    events.append("result posted")
    editor.join()
    assert events == ["position edit sent", "result posted"]
    with edits.position_edit("job") as allowed:
        assert not allowed  # once final, no position edit goes out
