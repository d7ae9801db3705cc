"""First run (`make run` → launch/): never someone else's Redis, one clear line for a busy port,
and the tiny random-weight model announced as what it is, in the logs and on the web page."""

from __future__ import annotations

import argparse
import socket
import threading

import pytest
from redis import Redis

import launch.stack as stack
from core.demo import NOTICE, random_weights
from settings.config import Settings
from tests.support.stack import free_port


def args(tmp_path) -> argparse.Namespace:
    return argparse.Namespace(tiny_dir=tmp_path / "tiny", redis_dir=tmp_path / "redis")


def test_the_launcher_never_writes_into_a_redis_it_did_not_start(redis_server, tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "OWN_REDIS_URL", redis_server.url)  # "its" port answers: a stranger's
    before = Redis.from_url(redis_server.url).dbsize()
    with pytest.raises(SystemExit) as exit_:
        stack.run(args(tmp_path), Settings(_env_file=None), [], threading.Event())
    assert "IMAGINE_REDIS_URL" in str(exit_.value) and "\n" not in str(exit_.value)
    assert Redis.from_url(redis_server.url).dbsize() == before
    assert not (tmp_path / "redis").exists()


def test_a_busy_web_port_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "OWN_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(_env_file=None, web_port=taken.getsockname()[1])
        with pytest.raises(SystemExit) as exit_:
            stack.run(args(tmp_path), settings, children := [], threading.Event())
    assert "IMAGINE_WEB_PORT" in str(exit_.value) and "\n" not in str(exit_.value)
    assert children == []  # nothing started


def test_the_tiny_model_says_it_draws_noise_on_the_page(tiny_model_dir):
    import gradio as gr

    from web.app import add_demo_notice

    assert random_weights(str(tiny_model_dir)) and not random_weights("nota-ai/bk-sdm-small")
    tiny = {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64}
    with gr.Blocks() as ui:
        gr.Markdown("page")
    add_demo_notice(ui, Settings(_env_file=None, models={"tiny": tiny}, default_model="tiny"))
    texts = [getattr(block, "value", "") for block in ui.blocks.values()]
    assert any(NOTICE in str(text) for text in texts)
    with gr.Blocks() as real:
        gr.Markdown("page")
    add_demo_notice(real, Settings(_env_file=None))
    assert not any(NOTICE in str(getattr(block, "value", "")) for block in real.blocks.values())


def test_web_images_leave_redis_soon_after_the_page_has_them(redis_server):
    from core.jobs import JobResult, Timings
    from web.jobs import WEB_IMAGE_KEEP_S, WebJobs

    redis = Redis.from_url(redis_server.url)
    key = "firstrun:images:web-1:0"
    redis.set(key, b"\x89PNG...", ex=3600)  # stored for the result TTL
    result = JobResult(job_id="web-1", model="tiny", seeds=[1], width=64, height=64, image_keys=[key, ""],
                       timings=Timings(queue_wait_ms=0, inference_ms=0, total_ms=0))
    jobs = WebJobs(redis, Settings(_env_file=None, redis_url=redis_server.url, queue_prefix="firstrun"))
    assert jobs.images(result) == [b"\x89PNG...", None]
    assert 0 < redis.ttl(key) <= WEB_IMAGE_KEEP_S < 3600
