"""What a waiting user sees: fleet numbers and ETA, queue and progress texts, custom ids,
latent previews, the progress reporter's rate limit, position edits against the result."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis

from bot.buttons import CancelButton, ModelSwitch, ResultButton
from core.fleet import FleetStats, eta_seconds, format_duration, percentile, work_units
from core.jobs import JobRequest
from core.texts import (
    cancel_custom_id,
    model_custom_id,
    progress_bar,
    queued_text,
    result_custom_id,
)
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


def test_progress_reporter_sends_latest_step_at_most_once_per_interval():
    sent: list[tuple[float, int]] = []
    reporter = ProgressReporter(lambda step, total, png: sent.append((time.monotonic(), step)), interval_s=0.2)
    for step in range(1, 51):
        reporter.on_step(step, 50, torch.zeros(1, 4, 2, 2))
        time.sleep(0.01)  # a 10 ms step: the interval is what is tested
    reporter.close()
    assert 2 <= len(sent) <= 4
    assert all(b[0] - a[0] >= 0.19 for a, b in zip(sent, sent[1:]))
    assert sent[0][1] == 1 and [s for _, s in sent] == sorted(s for _, s in sent)
    assert not [t for t in threading.enumerate() if t.name == "progress" and t.is_alive()]


def test_a_failing_preview_decoder_costs_the_picture_not_the_step_bar(caplog):
    sent: list[tuple[int, bytes | None]] = []

    def broken_decoder(latents: torch.Tensor) -> bytes:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    reporter = ProgressReporter(lambda step, total, png: sent.append((step, png)), interval_s=0,
                                preview=broken_decoder)
    reporter.on_step(3, 10, torch.zeros(1, 4, 2, 2))
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.close()
    assert sent and sent[0] == (3, None)  # the edit went out, without a preview
    assert "progress preview failed" in caplog.text


def test_a_position_edit_in_flight_holds_the_result_back_and_a_final_job_gets_none(redis_server):
    from core.position_edits import PositionEdits

    edits = PositionEdits(Redis.from_url(redis_server.url), f"pos{time.time_ns()}", lease_s=5)
    events: list[str] = []
    in_flight = threading.Event()

    def slow_position_edit():
        with edits.position_edit("job") as allowed:
            assert allowed
            in_flight.set()
            time.sleep(0.5)  # a slow edit (e.g. discord.py retrying a 5xx): what finalize must wait out
            events.append("position edit sent")

    editor = threading.Thread(target=slow_position_edit)
    editor.start()
    assert in_flight.wait(10)
    edits.finalize("job")  # the result is about to be posted
    events.append("result posted")
    editor.join()
    assert events == ["position edit sent", "result posted"]
    with edits.position_edit("job") as allowed:
        assert not allowed  # once final, no position edit goes out


def test_position_edits_keep_the_notes_the_user_was_given(redis_server):
    """"steps lowered to the server's cap" said when queued stays on the message when a worker
    later edits its position."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from core.queue import JobQueue
    from core.texts import queued_text
    from settings.config import Settings
    from tests.support.fake_discord import snowflake
    from worker.progress import notes_of

    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=f"notes{snowflake()[-6:]}")
    jobs = JobQueue(Redis.from_url(redis_server.url), settings)
    request = JobRequest(job_id=f"n-{snowflake()}", model="bk-sdm-small", prompt="a lake", steps=2, guidance=7,
                         seed=1, size=512)
    jobs.submit(request, notes=("`steps` lowered to the server's cap of 20",))
    job = Job.fetch(request.job_id, connection=jobs.redis, serializer=JSONSerializer)
    text = queued_text(request.model, request.prompt, 1, 3, None, notes=notes_of(job))
    assert text.endswith("\nℹ️ `steps` lowered to the server's cap of 20") and "#3" in text
    assert len(queued_text("m", "x" * 4000, 1, 1, None, notes=["y" * 3000])) <= 2000
