"""The benchmark scripts run (tiny configs) and the shipped architectures are the real ones.

The scripts run as a user runs them (``python -m bench.…``): tests never import ``bench/``
(``bench/`` imports ``tests/support/``, the dependency runs one way)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.architectures import UNETS, build_unet
from tests.support.stack import ROOT


def bench(module: str, *args: str, timeout: float = 300) -> str:
    """Run ``python -m bench.<module> args…``; its stdout (it must exit 0)."""
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("key, millions", [
    ("bk-sdm-small", 482.3), ("sd-v1-4", 859.5), ("ssd-1b", 1331.3), ("sdxl-base", 2567.5),
])
def test_shipped_unet_configs_have_the_published_sizes(key, millions):
    with torch.device("meta"):  # shapes only, no memory
        unet = build_unet(key)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == millions
    assert set(UNETS) == {"bk-sdm-small", "sd-v1-4", "ssd-1b", "sdxl-base"}


@pytest.mark.e2e
def test_seed_table_compares_plain_and_imagine_paths(tmp_path):
    out = tmp_path / "table.json"
    printed = bench("seed_table", "--tiny", "--models", "bk-sdm-small,ssd-1b", "--steps", "1", "--runs", "1",
                    "--depth", "4", "--batch", "4", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["bk-sdm-small", "ssd-1b"]
    for row in rows:
        assert row["plain_ms"] > 0 and row["imagine_ms"] > 0 and row["imagine_img_per_s"] > 0
        assert row["max_pixel_diff"] <= 2  # the optimized path draws the same image
    assert "imagine img/s@4" in printed
    # --json keeps what was printed (it is rewritten after each model, so a run cut short keeps it).
    assert json.loads(printed.splitlines()[-1])["rows"] == rows and json.loads(out.read_text())["batch"] == 4


@pytest.mark.e2e
def test_ablation_times_each_optimization_against_plain(tmp_path):
    out = tmp_path / "ablation.json"
    bench("ablation", "--tiny", "--models", "sd-v1-4", "--steps", "1", "--runs", "1", "--json", str(out))
    times = json.loads(out.read_text())["ms"]["sd-v1-4"]
    assert {"plain", "fp16_vae", "fuse_qkv", "channels_last", "all_eager"} <= set(times)
    assert all(ms > 0 for ms in times.values())


@pytest.mark.e2e
def test_scale_simulation_runs_real_workers():
    printed = bench("queue_overhead", "--jobs", "0", "--enqueue", "0", "--workers", "2", "--work-ms", "50",
                    "--jobs-per-worker", "3")
    (row,) = json.loads(printed.splitlines()[-1])["scale"]
    assert row["workers"] == 2 and row["jobs_per_s"] > 0 and 0 < row["efficiency"] <= 1.05


@pytest.mark.e2e
def test_image_workflow_times_each_action_and_the_memory_of_sharing(tmp_path):
    out = tmp_path / "image_workflow.json"
    printed = bench("image_workflow", "--steps", "2", "--runs", "1", "--size", "64", "--memory-arch", "tiny",
                    "--memory-steps", "1", "--json", str(out))
    results = json.loads(out.read_text())
    for family in ("SD 1.x", "SDXL"):
        rows = {row["action"]: row for row in results["time"][family]}
        assert set(rows) == {"txt2img", "img2img (0.6)", "vary subtle", "vary strong", "txt2img ×2 size", "upscale ×2"}
        assert all(row["ms"] > 0 for row in rows.values()) and rows["txt2img"]["vs_txt2img"] == 1.0
    assert [row["case"] for row in results["memory"]] == ["txt2img", "txt2img+img2img", "copy"]
    assert "upscale ×2" in printed and "max RSS MiB" in printed


@pytest.mark.e2e
def test_ack_load_smoke_measures_real_bot_acks(tmp_path):
    """bench.ack_load --quick: one real bot process, 100 and 1000 /imagine per minute."""
    out = tmp_path / "ack.json"
    printed = bench("ack_load", "--quick", "--json", str(out), timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["processes"], r["rate_per_min"]) for r in rows] == [(1, 100), (1, 1000)]
    for row in rows:
        assert row["answered"] == row["sent"] > 0 and row["refused"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] < 3000
    assert "| processes | rate (/min) |" in printed


@pytest.mark.e2e
def test_gpu_speed_eager_stage_measures_every_option(tmp_path):
    out = tmp_path / "speed.json"
    printed = bench("gpu_speed", "--tiny", "--stage", "eager", "--models", "sd-v1-4", "--steps", "1",
                    "--runs", "1", "--json", str(out))
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "sd-v1-4" and row["plain_ms"] > 0 and row["eager_ms"] > 0
    # On CPU the quantized row is int8 (fp8 needs an Ada/Hopper GPU); it still draws the image.
    assert row["quantized"] == "int8" and row["quantized_ms"] > 0 and row["quantized_psnr"] > 20
    assert row["vae_decode_ms"] > 0 and row["tiny_decode_ms"] > 0
    assert row["fast_scheduler"] == "LCMScheduler" and row["fast_steps"] == 4 and row["fast_ms"] > 0
    assert row["fast_tiny_decode_ms"] > 0
    assert "fast+tiny" in printed


def gpu_sh(tmp_path, *stages: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu.sh", *stages], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT_DIR": str(tmp_path), "PYTHON": "false", **env})


def test_gpu_script_skips_stages_past_its_deadline_and_names_unknown_ones(tmp_path):
    # A fixed GPU slot: nothing starts once the deadline is near, and the run still ends cleanly.
    done = gpu_sh(tmp_path, "round2", DEADLINE="0")
    assert done.returncode == 0, done.stderr
    skipped = (tmp_path / "skipped.log").read_text().splitlines()
    assert skipped == [f"skipped {name}: deadline" for name in
                       ("step-kernels", "speed-eager", "speed-compiled-bk", "speed-restart-bk",
                        "speed-compiled-xl")]
    # "pending": what docs/benchmarks.md still marks not measured, the fp8/int8 graphs included.
    (tmp_path / "skipped.log").unlink()
    assert gpu_sh(tmp_path, "pending", DEADLINE="0").returncode == 0
    assert (tmp_path / "skipped.log").read_text().splitlines() == [
        f"skipped {name}: deadline" for name in ("step-kernels", "speed-compiled-bk", "speed-restart-bk",
                                                 "speed-compiled-xl", "speed-quantized-bk")]
    unknown = gpu_sh(tmp_path, "speed-eagre")
    assert unknown.returncode == 2 and "unknown stage: speed-eagre" in unknown.stderr


@pytest.mark.e2e
def test_a_restart_loads_the_weights_the_first_start_saved(tmp_path):
    """``--weights-dir``: the first start builds the random weights and saves them; the restart
    loads them with the worker's own loading code, as a real worker's restart does."""
    rows = []
    for start in ("first", "restart"):
        out = tmp_path / f"{start}.json"
        printed = bench("gpu_speed", "--tiny", "--stage", "compiled", "--compile", "none", "--models", "bk-sdm-small",
                        "--steps", "1", "--runs", "1", "--depth", "2", "--batch-sizes", "1",
                        "--weights-dir", str(tmp_path / "weights"), "--json", str(out))
        report = json.loads(out.read_text())
        assert 0 < report["imported_at_s"] <= report["rows"][0]["built_at_s"]  # a start's parts, in order
        rows.append(report["rows"][0])
        assert "weights" in printed  # the table names how the weights came
    assert [row["weights"] for row in rows] == ["built", "loaded"]
    assert (tmp_path / "weights" / "bk-sdm-small" / "model_index.json").exists()
    assert not list((tmp_path / "weights").glob(".*partial"))
    assert rows[1]["ready_s"] >= rows[1]["warmup_s"] > 0 and rows[1]["imagine_ms"] > 0


@pytest.mark.e2e
def test_gpu_speed_compiled_stage_times_and_profiles_each_model(tmp_path):
    # --compile none: the stage's whole flow in seconds (a real compile takes minutes on CPU).
    out = tmp_path / "compiled.json"
    printed = bench("gpu_speed", "--tiny", "--stage", "compiled", "--compile", "none", "--models",
                    "bk-sdm-small,sd-v1-4", "--steps", "2", "--runs", "1", "--depth", "4", "--batch-sizes", "1,2",
                    "--cache-dir", str(tmp_path / "cache"), "--profile", str(tmp_path), "--trace",
                    "--json", str(out))
    first, second = json.loads(out.read_text())["rows"]
    assert first["imagine_ms"] > 0 and first["imagine_img_per_s"] > 0 and first["batch_sizes"] == [1, 2]
    assert first["ready_s"] >= first["warmup_s"] > 0 and second["ready_s"] is None  # only a process's first model starts it
    profile = first["profile"]
    assert profile["steps"] == 2 and profile["wall_ms"] > 0 and profile["scheduler_step_cpu_ms_per_step"] > 0
    assert (tmp_path / "bk-sdm-small.trace.json").stat().st_size > 0
    # The fused scheduler step against diffusers' own, in the same process.
    assert first["diffusers_step_ms"] > 0 and first["fused_step_gain"] > 0 and "unfused ms" in printed
    assert first["fast_scheduler"] == "DPMSolverMultistepScheduler" and first["fast_ms"] > 0  # no adapter: same graphs
    assert first["fast_4_steps_ms"] > 0  # the targets are at 4 steps; the catalog runs 12
    assert "fast_ms" not in second  # sd-v1-4's fast mode needs its LoRA: not in this stage
    assert "profile:" in printed and "ready s" in printed


@pytest.mark.e2e
def test_fused_step_bench_compares_the_step_alone(tmp_path):
    out = tmp_path / "step.json"
    printed = bench("fused_step", "--device", "cpu", "--size", "64", "--steps", "5", "--runs", "1",
                    "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["PNDMScheduler", "EulerDiscreteScheduler",
                                              "DPMSolverMultistepScheduler"]
    for row in rows:
        assert row["plain_step_ms"] > 0 and row["fused_step_ms"] > 0 and row["max_abs_diff"] < 1e-3
        assert row["plain_kernels_per_step"] is None  # kernels and syncs are counted on CUDA only
    assert "| PNDMScheduler | n/a (CPU) |" in printed
