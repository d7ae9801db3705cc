"""torch.compile's caches on a directory that survives a restart (worker.compile_cache): a second
process loads the first one's graphs; an unreadable cache file never stops a worker; the file
is replaced atomically."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

from tests.support.stack import ROOT
from worker import compile_cache
from worker.compile_cache import artifact_path, save_compile_cache, use_compile_cache

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                   "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture
def isolated(monkeypatch):
    """use_compile_cache changes process-wide torch state: put it back after the test."""
    for name in CACHE_VARIABLES:
        monkeypatch.setenv(name, "unset-by-test")  # recorded, restored (or removed) afterwards
    # torch's config modules are not plain modules (monkeypatch cannot restore them): their own patch.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def test_points_inductor_and_triton_caches_at_the_directory(tmp_path, isolated):
    use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
    assert (tmp_path / "cache" / "inductor").is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "cache" / "inductor")  # what inductor itself will use


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory"])
def test_an_unreadable_artifact_file_is_logged_and_ignored(tmp_path, isolated, caplog, damage):
    path = artifact_path(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    if damage == "garbage":
        path.write_bytes(b"\x00not a cache\xff" * 100)
    elif damage == "truncated":  # a real header cut short
        path.write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00\x10")
    else:
        path.mkdir()  # cannot even be read
    with caplog.at_level(logging.WARNING, logger="worker.compile_cache"):
        use_compile_cache(tmp_path)  # no exception: the worker compiles from scratch
    assert any("ignoring unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["a file in the way", "read-only"])
def test_an_unusable_directory_is_logged_and_the_worker_compiles_into_a_fresh_one(tmp_path, isolated, caplog,
                                                                                  monkeypatch, damage):
    if damage == "a file in the way":
        (tmp_path / "a file").write_text("not a directory")
        cache = tmp_path / "a file" / "cache"
    else:  # mkdir(exist_ok=True) succeeds on a read-only volume whose folders exist; writes fail
        cache = tmp_path / "cache"
        (cache / "inductor").mkdir(parents=True)

        def read_only(*args, **kwargs):
            raise PermissionError(30, "Read-only file system")

        monkeypatch.setattr("worker.compile_cache.tempfile.TemporaryFile", read_only)
    with caplog.at_level(logging.WARNING, logger="worker.compile_cache"):
        use_compile_cache(cache)
    # Never left pointing at the unusable place (the image's environment names it).
    inductor = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert not inductor.is_relative_to(cache) and inductor.parent.is_dir()
    assert not Path(os.environ["TRITON_CACHE_DIR"]).is_relative_to(cache)
    assert any("cannot write" in r.getMessage() for r in caplog.records)


class FakeInfo:
    artifacts = {"inductor": ["k"]}


def test_save_replaces_the_file_atomically_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"new artifacts", FakeInfo()))
    artifact_path(tmp_path).write_bytes(b"old artifacts")
    assert save_compile_cache(tmp_path) == artifact_path(tmp_path)
    assert artifact_path(tmp_path).read_bytes() == b"new artifacts"
    assert [p.name for p in tmp_path.iterdir()] == [artifact_path(tmp_path).name]
    assert artifact_path(tmp_path).stat().st_mode & 0o044  # other workers' users can read it


def test_a_failed_save_keeps_the_old_file_and_removes_its_temporary_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"new artifacts", FakeInfo()))
    artifact_path(tmp_path).write_bytes(b"old artifacts")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_cache.os, "replace", disk_full)
    with caplog.at_level(logging.WARNING, logger="worker.compile_cache"):
        assert save_compile_cache(tmp_path) is None  # logged; the worker goes on serving
    assert artifact_path(tmp_path).read_bytes() == b"old artifacts"
    assert [p.name for p in tmp_path.iterdir()] == [artifact_path(tmp_path).name]
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_nothing_compiled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert save_compile_cache(tmp_path) is None and not artifact_path(tmp_path).exists()


def test_workers_serving_other_models_keep_their_own_artifact_file(tmp_path, monkeypatch, isolated):
    """One volume, workers of other models: none overwrites another's file, so each one's restart
    after a pruned directory finds its own graphs."""
    def save_as(models: list[str], mode: str, content: bytes) -> Path:
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (content, FakeInfo()))
        return save_compile_cache(tmp_path, models, mode)

    a = save_as(["sdxl-base"], "reduce-overhead", b"A's graphs")
    b = save_as(["bk-sdm-small", "sd-1.5"], "reduce-overhead", b"B's graphs")
    assert a.name == f"artifacts-torch-{torch.__version__}-reduce-overhead-sdxl-base.bin"
    assert a != b and a.read_bytes() == b"A's graphs" and b.read_bytes() == b"B's graphs"
    # The same models listed in another order: the same file (workers of one set share it).
    assert save_as(["sd-1.5", "bk-sdm-small", "sd-1.5"], "reduce-overhead", b"B's graphs, later") == b
    # Another compile mode compiles other graphs: a file of its own.
    assert save_as(["sdxl-base"], "max-autotune", b"A tuned") not in (a, b)
    assert len(list(tmp_path.glob("*.bin"))) == 3 and a.read_bytes() == b"A's graphs"
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or FakeInfo())
    use_compile_cache(tmp_path, ["sd-1.5", "bk-sdm-small"], "reduce-overhead")  # B restarts
    assert loaded == [b"B's graphs, later"]


def test_the_artifact_file_name_stays_short_and_stable(tmp_path):
    many = [f"model-{index}" for index in range(30)]
    path = artifact_path(tmp_path, many, "default")
    assert path == artifact_path(tmp_path, reversed(many), "default") and len(path.name) < 100
    assert path != artifact_path(tmp_path, many[:-1], "default")
    assert artifact_path(tmp_path, ["../x"], "default").parent == tmp_path  # never outside the directory
    # Neither given (bench.gpu_speed): the file every caller shared before.
    assert artifact_path(tmp_path).name == f"artifacts-torch-{torch.__version__}.bin"


COMPILE_ONCE = """
import json, sys
import torch
from worker.compile_cache import cache_counts, save_compile_cache, use_compile_cache
use_compile_cache(sys.argv[1])
model = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)),
                      fullgraph=True)
with torch.no_grad():
    model(torch.randn(2, 8))
save_compile_cache(sys.argv[1])
print(json.dumps(cache_counts()))
"""


def compile_in_a_fresh_process(directory: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(directory)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow  # torch.compile on CPU builds C++: tens of seconds per process
def test_a_restarted_process_loads_the_compiled_graph_from_the_directory(tmp_path):
    first = compile_in_a_fresh_process(tmp_path)
    assert first["fxgraph_miss"] > 0 and first["fxgraph_hit"] == 0
    assert artifact_path(tmp_path).is_file()
    restarted = compile_in_a_fresh_process(tmp_path)
    assert restarted["fxgraph_hit"] > 0 and restarted["fxgraph_miss"] == 0
    # The artifact file alone (inductor's folders gone, or the file copied to another host) is enough.
    subprocess.run(["rm", "-rf", str(tmp_path / "inductor")], check=True)
    from_file = compile_in_a_fresh_process(tmp_path)
    assert from_file["fxgraph_hit"] > 0 and from_file["fxgraph_miss"] == 0


@pytest.mark.e2e  # starts the benchmark's processes
def test_cold_start_benchmark_times_two_fresh_starts(tmp_path):
    # --compile none: the benchmark's flow in seconds (the cache across processes is tested above).
    out = tmp_path / "cold.json"
    done = subprocess.run([sys.executable, "-m", "bench.cold_start", "--tiny", "--compile", "none",
                           "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    first, cached = report["starts"]
    assert first["ready_s"] > first["warm_up_s"] > 0 and cached["ready_s"] > 0 and report["ratio"] > 0
    assert first["shapes"] == [[64, 1]]  # an eager worker warms one small run
    assert "cached start s" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "bench.cold_start", "--cache-dir", str(tmp_path / "cache")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "is not empty" in refused.stderr  # a first start must be cold


@pytest.mark.parametrize("compile_mode", ["default", "none"])
def test_a_compiled_worker_uses_the_cache_before_compiling_and_saves_it_after_warm_up(
        tmp_path, monkeypatch, tiny_model_dir, compile_mode):
    from settings.config import Settings
    from worker import main

    calls = []
    # Used where the worker's pipelines are built (worker.pipelines.resident_pipelines, the CLI's too).
    monkeypatch.setattr(compile_cache, "use_compile_cache", lambda *args: calls.append(("use", *args)))
    monkeypatch.setattr(main, "warm_up", lambda *args: calls.append(("warm up",)))
    monkeypatch.setattr(main, "save_compile_cache", lambda *args: calls.append(("save", *args)))
    settings = Settings(_env_file=None, device="cpu", compile=compile_mode, compile_cache_dir=tmp_path,
                        worker_models=["tiny"],
                        models={"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline",
                                         "native_size": 64, "variant": None}})
    main.load_pipelines(settings)
    if compile_mode == "none":  # nothing to cache
        assert calls == [("warm up",)]
    else:  # the artifact file of what this worker serves (artifact_path)
        assert calls == [("use", tmp_path, ["tiny"], compile_mode), ("warm up",),
                         ("save", tmp_path, ["tiny"], compile_mode)]
