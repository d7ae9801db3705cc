"""The benchmark scripts run (tiny configs) and the shipped architectures are the real ones."""

from __future__ import annotations

import json

import pytest
import torch

from bench import ablation, queue_overhead, seed_table
from bench.architectures import UNETS, build_unet


@pytest.mark.parametrize("key, millions", [
    ("bk-sdm-small", 482.3), ("sd-v1-4", 859.5), ("ssd-1b", 1331.3), ("sdxl-base", 2567.5),
])
def test_shipped_unet_configs_have_the_published_sizes(key, millions):
    with torch.device("meta"):  # shapes only, no memory
        unet = build_unet(key)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == millions
    assert set(UNETS) == {"bk-sdm-small", "sd-v1-4", "ssd-1b", "sdxl-base"}


def test_seed_table_compares_plain_and_imagine_paths(capsys):
    rows = seed_table.main(["--tiny", "--models", "bk-sdm-small,ssd-1b", "--steps", "1", "--runs", "1",
                            "--depth", "4", "--batch", "4"])
    assert [r["model"] for r in rows] == ["bk-sdm-small", "ssd-1b"]
    for row in rows:
        assert row["plain_ms"] > 0 and row["imagine_ms"] > 0 and row["imagine_img_per_s"] > 0
        assert row["max_pixel_diff"] <= 2  # the optimized path draws the same image
    assert "imagine img/s@4" in capsys.readouterr().out


def test_seed_table_keeps_each_finished_model_in_its_json(tmp_path):
    out = tmp_path / "table.json"
    seed_table.main(["--tiny", "--models", "bk-sdm-small", "--steps", "1", "--runs", "1", "--depth", "2",
                     "--batch", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["rows"]] == ["bk-sdm-small"] and report["batch"] == 2


def test_ablation_times_each_optimization_against_plain(tmp_path):
    report = ablation.main(["--tiny", "--models", "sd-v1-4", "--steps", "1", "--runs", "1",
                            "--json", str(tmp_path / "ablation.json")])
    assert set(report["ms"]["sd-v1-4"]) == set(ablation.VARIANTS)
    assert all(ms > 0 for ms in report["ms"]["sd-v1-4"].values())


def test_scale_simulation_runs_real_workers(redis_server):
    row = queue_overhead.scale(redis_server.url, workers=2, work_ms=50, jobs_per_worker=3)
    assert row["workers"] == 2 and row["jobs_per_s"] > 0 and 0 < row["efficiency"] <= 1.05
