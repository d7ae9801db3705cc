"""``python -m launch`` as a newcomer runs it: no Redis running, no weights, no Discord token.

The launcher must start redis-server, the tiny model's worker and the web UI; a real headless
Chromium types a prompt and gets an image; the web's jobs go through the same validation and
queue; Ctrl-C stops every process.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import PROGRESS_META
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.stack import ROOT, Process, Processes, free_port, wait_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = ROOT / "docs" / "web-ui.png"


def start_launcher(processes: Processes, env: dict[str, str], *args: str) -> Process:
    """``python -m launch args…``; stopped as from a terminal's Ctrl-C (SIGINT)."""
    return processes.start([sys.executable, "-m", "launch", *args], env, "launch",
                           stop_signal=signal.SIGINT, stop_timeout=60)


def pids(launcher: Process) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (\S+) .*?\(pid (\d+)\)", launcher.log())}


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory, processes):
    tmp = tmp_path_factory.mktemp("launch")
    ports = {"redis": free_port(), "web": free_port(), "worker_metrics": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "IMAGINE_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
                "IMAGINE_WEB_PORT": str(ports["web"]),
                "IMAGINE_WORKER_METRICS_PORT": str(ports["worker_metrics"]), "IMAGINE_DEVICE": "cpu"})
    launcher = start_launcher(processes, env, "--tiny-dir", str(tiny_model_dir), "--redis-dir", str(tmp / "redis"))
    launcher.wait_ready(lambda: "ready: web UI" in launcher.log(), 120, "stack ready")
    return {"launcher": launcher, "ports": ports, "env": env}


def web_url(stack) -> str:
    return f"http://127.0.0.1:{stack['ports']['web']}/"


def test_launcher_started_redis_worker_and_web_but_no_bot(stack):
    assert set(pids(stack["launcher"])) == {"redis-server", "worker", "web"}
    assert "Discord bot off" in stack["launcher"].log()
    assert Redis.from_url(stack["env"]["IMAGINE_REDIS_URL"]).config_get("appendonly") == {"appendonly": "yes"}


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not installed")
def test_browser_types_prompt_and_gets_image(stack, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,860"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(web_url(stack))
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("an orange cat staring off")
        seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
        seed.clear()
        seed.send_keys("1234")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results img"))[0]
        status = wait.until(lambda b: "Done" in b.find_element(By.CSS_SELECTOR, "#status").text
                            and b.find_element(By.CSS_SELECTOR, "#status").text)
        assert "seed 1234" in status
        assert re.search(r"queue \d+ ms · inference \d+ ms · store \d+ ms · total \d+ ms", status)
        with urllib.request.urlopen(image.get_attribute("src"), timeout=10) as response:
            pixels = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
        assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0
        shot = SCREENSHOT if os.environ.get("IMAGINE_UPDATE_SCREENSHOT") else tmp_path / "web-ui.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()


def web_jobs(stack, tiny_model_dir):
    """The web's queue client, configured as the launcher configures the web process."""
    from web.jobs import WebJobs

    tiny = {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
            "default_steps": 4, "variant": None}
    settings = Settings(_env_file=None, redis_url=stack["env"]["IMAGINE_REDIS_URL"],
                        models={"tiny": tiny}, default_model="tiny", min_size=64)
    return WebJobs(Redis.from_url(settings.redis_url), settings)


def test_web_job_shows_position_then_images_with_seeds_and_latency(stack, tiny_model_dir):
    from web.app import run_job

    jobs = web_jobs(stack, tiny_model_dir)
    updates = list(run_job(jobs, ImagineOptions("a lighthouse at dusk", seed=77, count=2)))
    assert updates[0][0].startswith("Queued on **tiny** — position **#1**")
    text, gallery = updates[-1]
    assert text.startswith("Done: **tiny** · 64×64 · seeds **77, 78**")
    assert [caption for _, caption in gallery] == ["seed 77", "seed 78"]
    first, second = (np.asarray(image.convert("RGB")) for image, _ in gallery)
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    # The worker kept progress in the job while it ran, and the PNGs expire with the result.
    web = [Job.fetch(key.decode().removeprefix("rq:job:"), connection=jobs.redis, serializer=JSONSerializer)
           for key in jobs.redis.keys("rq:job:web-*")]
    job = next(job for job in web if job.args[0]["prompt"] == "a lighthouse at dusk")
    assert job.meta[PROGRESS_META] == {"step": 4, "steps": 4}
    keys = job.return_value()["image_keys"]
    assert len(keys) == 2 and all(0 < jobs.redis.ttl(key) <= 3600 for key in keys)


def test_web_rejects_bad_options_without_a_job(stack, tiny_model_dir):
    from web.app import run_job

    jobs = web_jobs(stack, tiny_model_dir)
    before = len(jobs.redis.keys("rq:job:*"))
    updates = list(run_job(jobs, ImagineOptions("cat", steps=500)))
    assert updates == [("**Cannot generate:** `steps` must be between 1 and 50 (got 500).", [])]
    assert len(jobs.redis.keys("rq:job:*")) == before


def test_front_ends_never_import_torch_or_discord():
    code = ("import sys, web.app, launch.stack, core.queue; "
            "print(sorted(m for m in ('torch', 'diffusers', 'discord') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_ctrl_c_stops_every_process(stack):
    """Runs last in this module: SIGINT as from a terminal's Ctrl-C."""
    launcher = stack["launcher"]
    started = pids(launcher)
    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.popen.wait(60) == 0, launcher.log()
    assert "all stopped" in launcher.log()
    for name, pid in started.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the launcher reaped it: no such process
    assert not _answers(stack["env"]["IMAGINE_REDIS_URL"])
    with pytest.raises(OSError):
        urllib.request.urlopen(web_url(stack), timeout=2)


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaiting its parent counts as gone.
    return "(Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


@pytest.mark.parametrize("ending", ["gives up", "SIGHUP"])
def test_launcher_never_hangs_on_or_leaves_behind_a_redis_it_started(tmp_path, processes, ending):
    """A redis-server that never answers (db 20 of 16) ends the launch with one line; closing
    the terminal (SIGHUP) while it waits stops it too. Either way no redis-server is left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env.update({"PYTHONPATH": str(ROOT), "IMAGINE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/20"})
    with start_launcher(processes, env, "--redis-dir", str(tmp_path / "redis")) as launcher:
        wait_for(lambda: "started redis-server" in launcher.log(), 30, what="redis started")
        if ending == "SIGHUP":
            launcher.popen.send_signal(signal.SIGHUP)
        code = launcher.popen.wait(40)
    redis_pid = pids(launcher)["redis-server"]
    assert not alive(redis_pid), launcher.log()
    assert "Traceback" not in launcher.log() and "all stopped" in launcher.log()
    if ending == "gives up":
        assert code == 1 and "error: the redis-server started here does not answer" in launcher.log()
    else:
        assert code == 0
