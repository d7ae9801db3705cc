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


def interpolated(value: str) -> str:
    """A compose value with ``${VAR:-default}`` read as its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def probe_port(service: dict) -> str:
    """The port a ``python -m core.probe PORT`` healthcheck asks for /healthz."""
    test = service["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "core.probe"], test
    return test[4]


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
        url = service["environment"]["IMAGINE_REDIS_URL"]
        # ${IMAGINE_REDIS_URL:-…}: a URL of the operator's (credentials, TLS) is not overridden.
        assert url.startswith("${IMAGINE_REDIS_URL:-")
        assert Settings(_env_file=None, redis_url=interpolated(url)).redis_url.startswith("redis://redis:")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    dashboard = " ".join(SERVICES["rq-dashboard"]["command"])
    assert "@redis:6379" in dashboard and "RQ_DASHBOARD_REDIS_URL" in dashboard
    assert "--json" in dashboard  # jobs are JSON-serialized (rq-dashboard 0.9's flag)


def test_one_gpu_per_worker_and_known_models():
    catalog = build_catalog()
    device_ids = []
    for name, worker in WORKERS.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"] and devices[0]["capabilities"] == ["gpu"]
        device_ids += devices[0]["device_ids"]
        models = Settings(_env_file=None, worker_models=json.loads(worker["environment"]["IMAGINE_WORKER_MODELS"])).worker_models
        assert models and set(models) <= set(catalog), name
        assert probe_port(worker) == worker["environment"]["IMAGINE_WORKER_METRICS_PORT"]
    assert len(device_ids) == len(set(device_ids)), "two workers on one GPU"


def test_metrics_and_web_ports_match_healthchecks():
    bot, web = SERVICES["bot"], SERVICES["web"]
    assert probe_port(bot) == bot["environment"]["IMAGINE_BOT_METRICS_PORT"]
    assert probe_port(web) == web["environment"]["IMAGINE_WEB_HEALTH_PORT"]
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
    # Its extra's dependencies from pyproject.toml (docker/deps.py) in a layer before the source,
    # then the project itself; both at the versions of docker/constraints.txt.
    assert installs[0] == f"-c /deps/constraints.txt $(python /deps/deps.py {extra} /deps/pyproject.toml)"
    assert installs[-1].startswith(f'--no-deps -c /deps/constraints.txt ".[{extra}]"')
    assert "-r " not in text and "requirements" not in text


def test_gradio_is_pinned_in_one_place():
    # docker/constraints.txt is the lock of the tested versions, not a second place to choose one.
    pinned = [path for path in (*ROOT.glob("docker/*"), ROOT / "Makefile", ROOT / "pyproject.toml")
              if path.name != "constraints.txt"
              and "gradio" in re.sub(r"#.*", "", path.read_text()).replace("gradio.", "")]
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


# -- issue 18: deployable for real ------------------------------------------------------------

DOCKERFILES = {path.name: path.read_text() for path in (ROOT / "docker").glob("Dockerfile.*")}


def test_every_service_runs_under_an_init_with_rotated_logs():
    for name, service in SERVICES.items():
        assert service.get("init") is True, f"{name}: init: true (SIGTERM forwarded, zombies reaped)"
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 1, name


def test_app_healthchecks_ask_healthz():
    for name in ("bot", "web", *WORKERS):
        assert probe_port(SERVICES[name]).isdigit(), name
    assert "/healthz" in (ROOT / "core" / "probe.py").read_text()


def secrets_of_service(name: str) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in SERVICES[name].get("secrets", [])}


def test_each_service_gets_only_the_secrets_it_uses():
    assert secrets_of_service("redis") == {"redis_password"}
    assert secrets_of_service("bot") == {"discord_token", "redis_password"}
    assert secrets_of_service("web") == {"redis_password"}  # no bot token in the web container
    assert secrets_of_service("rq-dashboard") == {"redis_password"}
    for name in WORKERS:  # the bot token: channel fallback when an interaction token expired
        assert secrets_of_service(name) == {"redis_password", "hf_token", "discord_token"}
    # Mounted where Settings reads them (secrets_dir /run/secrets, file = the variable's name).
    for name in ("bot", "web", *WORKERS):
        for secret in SERVICES[name]["secrets"]:
            assert f"IMAGINE_{secret['target'].removeprefix('imagine_').upper()}" in SETTING_KEYS
    assert set(COMPOSE["secrets"]) == {"redis_password", "discord_token", "hf_token"}
    assert all(s["file"].startswith("../secrets/") for s in COMPOSE["secrets"].values())
    assert "secrets/" in (ROOT / ".gitignore").read_text() and "secrets" in (ROOT / ".dockerignore").read_text()
    # No secret is set in an environment: block.
    for service in SERVICES.values():
        assert not {"IMAGINE_DISCORD_TOKEN", "IMAGINE_REDIS_PASSWORD", "IMAGINE_HF_TOKEN"} & env_keys(service)


def test_redis_needs_a_password_and_has_a_memory_limit():
    command = " ".join(SERVICES["redis"]["command"])
    assert "requirepass" in command and "/run/secrets/redis_password" in command
    assert "--maxmemory ${REDIS_MAXMEMORY:-" in command and "--maxmemory-policy noeviction" in command
    assert "REDISCLI_AUTH" in " ".join(SERVICES["redis"]["healthcheck"]["test"])


def test_base_images_are_pinned_by_digest():
    images = [SERVICES["redis"]["image"]]
    for text in DOCKERFILES.values():
        images += re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
        assert re.findall(r"^FROM (\S+)", text, re.M)[0] == "${PYTHON_IMAGE}"
    assert len(images) == 1 + len(DOCKERFILES)
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", image) for image in images), images


def test_dependency_layers_come_before_the_source():
    for name, text in DOCKERFILES.items():
        if "COPY . ." not in text:
            continue
        for stage in re.split(r"^FROM ", text, flags=re.M)[1:]:
            if "COPY . ." in stage:
                deps = stage.index("deps.py")
                assert deps < stage.index("COPY . ."), name
                assert "--no-deps" in stage[stage.index("COPY . ."):], name


def test_the_worker_image_can_compile_and_keeps_its_caches_on_a_volume():
    worker = DOCKERFILES["Dockerfile.worker"]
    assert "build-essential" in worker  # torch.compile builds C/Triton code at run time
    assert "IMAGINE_COMPILE_CACHE_DIR=/compile-cache " in worker  # worker.compile_cache
    assert "TORCHINDUCTOR_CACHE_DIR=/compile-cache/" in worker and "TRITON_CACHE_DIR=/compile-cache/" in worker
    assert "chown imagine /models /compile-cache" in worker  # a fresh named volume takes this owner
    for w in WORKERS.values():
        assert {"model-cache:/models", "compile-cache:/compile-cache"} <= set(w["volumes"])


def test_one_torch_version_everywhere():
    constraints = (ROOT / "docker" / "constraints.txt").read_text()
    version = re.search(r"^torch==([0-9.]+)$", constraints, re.M).group(1)
    assert "torch==$(shell sed -n 's/^torch==//p' $(CONSTRAINTS))" in (ROOT / "Makefile").read_text()
    assert "pytorch/pytorch" not in DOCKERFILES["Dockerfile.worker"]  # torch comes from the constraints
    assert f"torch {version}" in (ROOT / "docs" / "benchmarks.md").read_text()
    for line in constraints.splitlines():  # exact pins only
        assert not line or line.startswith("#") or re.match(r"^[A-Za-z0-9_.\-]+==[^=<>]+$", line), line


def test_metrics_listen_on_loopback_unless_compose_says_otherwise():
    assert Settings(_env_file=None).metrics_host == "127.0.0.1"
    for name in ("bot", "web", *WORKERS):
        assert SERVICES[name]["environment"]["IMAGINE_METRICS_HOST"] == "0.0.0.0"
        assert all(not str(port).endswith((":9101", ":9102", ":7861")) for port in SERVICES[name].get("ports", []))
