"""The layering README.md describes, checked on the source: who may import whom.

core/ is the Discord-free domain every front end and the worker share; settings/ is
configuration only; bot/, web/ and worker/ are adapters around core/ that never import each
other; tests/ never imports bench/ (bench/ may import tests/support/).
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.support.stack import ROOT

HEAVY = {"torch", "diffusers", "transformers", "accelerate"}
FORBIDDEN = {
    "core": {"discord", "gradio", "bot", "web", "worker", "launch", "tests", "bench"} | HEAVY,
    "settings": {"discord", "gradio", "redis", "rq", "core", "bot", "web", "worker", "tests", "bench"} | HEAVY,
    "bot": {"gradio", "web", "worker", "launch", "tests", "bench"} | HEAVY,
    "web": {"discord", "bot", "worker", "launch", "tests", "bench"} | HEAVY,
    "worker": {"gradio", "bot", "web", "launch", "tests", "bench"},
    "tests": {"bench"},
}
GATEWAY_CLIENTS = {"Client", "AutoShardedClient", "Bot", "AutoShardedBot"}


def imports_of(folder: str) -> dict[str, set[str]]:
    """Top-level package names each module of ``folder`` imports (at any depth in the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = found.setdefault(str(path.relative_to(ROOT)), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_import_only_what_they_may(folder):
    broken = {path: sorted(names & FORBIDDEN[folder]) for path, names in imports_of(folder).items()
              if names & FORBIDDEN[folder]}
    assert not broken


def test_the_worker_never_opens_a_gateway():
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("discord", "commands"):
                    assert node.attr not in GATEWAY_CLIENTS, f"{path}: {node.value.id}.{node.attr}"


def test_core_and_the_front_ends_load_no_heavy_module_at_run_time():
    """Transitive imports too: loading every core module, the bot's modules and the web's job
    code must not pull torch (nor discord.py into core, nor the bot into the web)."""
    modules = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
               for folder in ("core", "settings") for p in (ROOT / folder).glob("*.py")]
    script = f"""
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
core_loaded = set(sys.modules)
import web.jobs
web_loaded = set(sys.modules)
import bot.app
print(sorted({{m.split('.')[0] for m in core_loaded}} & {{'discord', 'torch', 'gradio', 'bot', 'web', 'worker'}}))
print(sorted({{m.split('.')[0] for m in web_loaded}} & {{'discord', 'torch', 'bot', 'worker'}}))
print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'diffusers', 'gradio', 'worker'}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["[]", "[]", "[]"]
