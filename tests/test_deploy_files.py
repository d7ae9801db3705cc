"""docker/compose.yaml, the Dockerfiles and .env.example agree with each other and with the
Settings the code reads (docker itself cannot run here)."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml

from settings.catalog import build_catalog
from settings.config import Settings
from tests.support.stack import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker")}
SETTING_KEYS = {f"IMAGINE_{name.upper()}" for name in Settings.model_fields}


def env_keys(service: dict) -> set[str]:
    return set(service.get("environment") or {})


def test_env_example_documents_every_setting_and_nothing_else():
    documented = set(re.findall(r"^#?\s*(IMAGINE_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert documented == SETTING_KEYS, (
        f"missing: {sorted(SETTING_KEYS - documented)}; unknown: {sorted(documented - SETTING_KEYS)}")


def test_env_example_loads_as_is_and_with_every_line_uncommented(tmp_path, monkeypatch):
    """`cp .env.example .env` must start the services: blank secrets count as unset, and each
    documented example value parses."""
    monkeypatch.chdir(tmp_path)
    example = (ROOT / ".env.example").read_text()
    for text in (example, re.sub(r"^#\s*(IMAGINE_[A-Z0-9_]+=)", r"\1", example, flags=re.M)):
        (tmp_path / ".env").write_text(text)
        settings = Settings()
        assert settings.discord_token is None and settings.application_id is None


def test_expected_services_with_healthchecks_and_restart():
    assert {"redis", "bot", "web", "rq-dashboard"} <= set(SERVICES) and len(WORKERS) >= 2
    for name, service in SERVICES.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_every_imagine_variable_is_a_setting():
    for name, service in SERVICES.items():
        unknown = {k for k in env_keys(service) if k.startswith("IMAGINE_")} - SETTING_KEYS
        assert not unknown, f"{name} sets unknown settings {unknown}"


def test_redis_is_durable_and_never_evicts():
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert option in command
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_named_volumes_are_declared():
    declared = set(COMPOSE["volumes"])
    used = {v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used and used <= declared


def test_app_services_reach_redis_by_service_name_and_wait_for_it():
    for name in ("bot", "web", *WORKERS):
        service = SERVICES[name]
        assert Settings(_env_file=None, redis_url=service["environment"]["IMAGINE_REDIS_URL"]).redis_url.startswith("redis://redis:")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis://redis:6379" in " ".join(SERVICES["rq-dashboard"]["command"])
    assert "--json" in SERVICES["rq-dashboard"]["command"]  # jobs are JSON-serialized


def test_one_gpu_per_worker_and_known_models():
    catalog = build_catalog()
    device_ids = []
    for name, worker in WORKERS.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"] and devices[0]["capabilities"] == ["gpu"]
        device_ids += devices[0]["device_ids"]
        models = Settings(_env_file=None, worker_models=json.loads(worker["environment"]["IMAGINE_WORKER_MODELS"])).worker_models
        assert models and set(models) <= set(catalog), name
        port = worker["environment"]["IMAGINE_WORKER_METRICS_PORT"]
        assert f":{port}/metrics" in " ".join(worker["healthcheck"]["test"])
    assert len(device_ids) == len(set(device_ids)), "two workers on one GPU"


def test_metrics_and_web_ports_match_healthchecks():
    bot, web = SERVICES["bot"], SERVICES["web"]
    assert f":{bot['environment']['IMAGINE_BOT_METRICS_PORT']}/metrics" in " ".join(bot["healthcheck"]["test"])
    port = web["environment"]["IMAGINE_WEB_PORT"]
    # Inside its container it listens everywhere; the host publishes it on loopback only.
    assert web["ports"] == [f"127.0.0.1:{port}:{port}"] and web["environment"]["IMAGINE_WEB_HOST"] == "0.0.0.0"
    assert all(str(p).startswith("127.0.0.1:") for s in SERVICES.values() for p in s.get("ports", []))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_builds_point_at_existing_dockerfiles_and_targets(name):
    build = SERVICES[name].get("build")
    if build is None:
        return
    dockerfile = (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.is_file()
    if "target" in build:
        assert re.search(rf"^FROM .+ AS {build['target']}$", dockerfile.read_text(), re.M)


def extra_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", r)[0].lower().replace("_", "-") for r in requirements}


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = extra_names(PROJECT["dependencies"])
EXTRAS = {name: extra_names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}


@pytest.mark.parametrize(("dockerfile", "target", "extra"), [
    ("Dockerfile.frontend", "bot", "bot"), ("Dockerfile.frontend", "web", "web"),
    ("Dockerfile.worker", None, "worker")])
def test_images_install_their_service_extra_from_pyproject(dockerfile, target, extra):
    text = (ROOT / "docker" / dockerfile).read_text()
    if target is not None:  # the RUN lines of that build stage only
        text = re.split(r"^FROM ", text.split(f" AS {target}\n", 1)[1], flags=re.M)[0]
    installs = re.findall(r"pip install (.+)", text)
    assert installs == [f'".[{extra}]"'] or installs[-1].startswith(f'".[{extra}]"')
    assert "-r " not in text and "requirements" not in text


def test_gradio_is_pinned_in_one_place():
    pinned = [path for path in (*ROOT.glob("docker/*"), ROOT / "Makefile", ROOT / "pyproject.toml")
              if "gradio" in re.sub(r"#.*", "", path.read_text()).replace("gradio.", "")]
    assert pinned == [ROOT / "pyproject.toml"]


@pytest.mark.parametrize(("extra", "folders"), [
    ("bot", ("bot", "core", "settings")), ("web", ("web", "core", "settings")),
    ("worker", ("worker", "core", "settings"))])
def test_each_service_extra_covers_what_its_code_imports(extra, folders):
    """An image installs the base dependencies and its extra: every third-party package that
    the service's code imports must be there, and the front ends never get torch."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    local = {"core", "bot", "web", "launch", "settings", "worker", "tests", "bench"}
    distributions = packages_distributions()
    imported = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - local if m not in sys.stdlib_module_names}
    needed = {d.lower().replace("_", "-") for m in third_party for d in distributions.get(m, [m])}
    # Packages that come with the ones listed (discord.py brings aiohttp and yarl, pydantic its core).
    transitive = {"aiohttp", "yarl", "pydantic-core", "typing-extensions"}
    assert needed - BASE - EXTRAS[extra] - transitive == set()
    if extra != "worker":
        assert not {"torch", "diffusers", "transformers"} & (BASE | EXTRAS[extra])
