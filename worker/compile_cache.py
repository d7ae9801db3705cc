"""torch.compile's caches on a persistent directory, so a compiled worker restarted on the same
host loads its compiled graphs instead of compiling every warm-up shape again.

Two layers, both under one directory (a volume in docker/compose.yaml):

- inductor's own on-disk caches (FX graph cache, AOTAutograd cache, Triton kernels): found by
  key on the next start as long as the directory survives;
- the portable "mega cache" (``torch.compiler.save_cache_artifacts``): one file with every
  artifact this process compiled or loaded, written after warm-up and loaded back into the
  on-disk caches at start. It restores them after the directory's inner files were pruned or
  when the file alone was copied to a fresh host. One file per torch version and what the
  worker serves (:func:`artifact_path`: its models and compile mode).

Sharing one directory between workers of the same image is safe. Every entry is found by a key
that hashes the graph, its inputs' shapes/strides/dtypes, the inductor config, the torch version
and the device (GPU model, CUDA and Triton versions), and torch's code hash: a different GPU,
torch build or model code never reads another's entry, it misses and compiles. torch writes each
entry to a temporary file and renames it, so concurrent workers only ever race to write the same
content. The artifact file is replaced the same way (``save_compile_cache``): the last worker to
finish warming up wins, with a complete file. Its name carries the torch version, the compile
mode and the served models, so a worker never overwrites the file of another image or of workers
serving other models (whose restart after a pruned directory would then compile everything);
workers serving the same models share one, listed in any order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,80}")


def artifact_path(directory: Path, models: Iterable[str] = (), compile_mode: str | None = None) -> Path:
    """The mega-cache file of one torch version (its entries are useless to another) and of what
    a worker serves: its models' catalog keys, sorted (the order they are listed in does not
    matter), and its compile mode, e.g. ``artifacts-torch-2.9.1-reduce-overhead-a+b.bin``.
    Neither given: one file for the torch version (a caller that serves no named models)."""
    served = "+".join(sorted(set(models)))
    if served and not SAFE_NAME.fullmatch(served):  # many models, or keys not made for file names
        served = hashlib.sha256(served.encode()).hexdigest()[:16]
    name = "-".join(part for part in (f"artifacts-torch-{torch.__version__}", compile_mode, served) if part)
    return Path(directory) / f"{name}.bin"


def use_compile_cache(directory: Path, models: Iterable[str] = (), compile_mode: str | None = None) -> None:
    """Point torch.compile's caches at ``directory``; call before the first compile. Loads the
    artifact file saved by an earlier start serving the same models (:func:`artifact_path`), if
    any; an unreadable one is logged and ignored."""
    directory = Path(directory).absolute()
    problem = unwritable(directory)
    if problem is not None:  # e.g. a volume mounted read-only or owned by another user
        # Not torch's default: the image's environment may name this very directory, and
        # inductor would fail there at the first compile. A fresh one, lost on restart.
        fallback = Path(tempfile.mkdtemp(prefix="imagine-compile-cache-"))
        log.warning("compile cache: cannot write %s (%s); compiling into %s (lost on restart)",
                    directory, problem, fallback)
        directory = fallback
    # Environment as well as config: inductor's compile subprocesses read the variables.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    # On by default in open-source torch; forced here so a build that defaults them off still caches.
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    load_artifacts(artifact_path(directory, models, compile_mode))


def unwritable(directory: Path) -> str | None:
    """Why the cache cannot be written there (None when it can): a real file written and removed,
    since a read-only or foreign-owned volume lets ``mkdir(exist_ok=True)`` succeed."""
    try:
        for sub in ("inductor", "triton"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory / sub):
                pass
    except OSError as error:
        return str(error)
    return None


def load_artifacts(path: Path) -> int:
    """Hot-load a saved artifact file into the on-disk caches; the number of artifacts loaded
    (0 when there is none or it cannot be read: the worker then compiles from scratch)."""
    if not path.exists():
        log.info("compile cache: no artifact file at %s yet (first start compiles)", path)
        return 0
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as error:  # a cache must never stop the worker: compiling is the fallback
        log.warning("compile cache: ignoring unreadable %s (%s); compiling from scratch", path, error)
        return 0
    if info is None:  # torch logged why it could not deserialize the file
        log.warning("compile cache: ignoring unreadable %s; compiling from scratch", path)
        return 0
    count = sum(len(keys) for keys in getattr(info, "artifacts", {}).values())
    log.info("compile cache: loaded %d artifact(s) from %s", count, path)
    return count


def save_compile_cache(directory: Path, models: Iterable[str] = (), compile_mode: str | None = None) -> Path | None:
    """After warm-up: write every artifact this process compiled or loaded to the artifact file
    of what it serves (:func:`artifact_path`), atomically (temporary file + rename), so a crash
    mid-write leaves the old file or none."""
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as error:
        log.warning("compile cache: could not serialize artifacts (%s); not saved", error)
        return None
    if saved is None:  # nothing compiled or loaded in this process
        return None
    target = artifact_path(directory, models, compile_mode)
    try:
        if target.exists() and target.read_bytes() == saved[0]:
            return target  # a cached start loaded exactly this: no rewrite by every worker
        write_atomic(target, saved[0])
    except OSError as error:  # full or read-only volume: the next start compiles, nothing worse
        log.warning("compile cache: could not write %s (%s)", target, error)
        return None
    log.info("compile cache: saved %d byte(s) to %s", len(saved[0]), target)
    return target


def write_atomic(target: Path, content: bytes) -> None:
    """A unique temporary file in the same directory (same file system), renamed over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from workers run as another user
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cache_counts() -> dict[str, int]:
    """This process's cache lookups so far: FX graph (inductor) and AOTAutograd hits/misses."""
    from torch._dynamo.utils import counters

    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def describe_counts(counts: dict[str, int]) -> str:
    return (f"{counts['fxgraph_hit']} hit(s) / {counts['fxgraph_miss']} miss(es) FX graph, "
            f"{counts['autograd_hit']} / {counts['autograd_miss']} AOTAutograd")
