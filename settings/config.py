"""Runtime configuration, read from the environment (prefix ``IMAGINE_``) or a ``.env`` file.

One :class:`Settings` object is built at each entry point and passed down; no module reads the
environment on its own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from settings.catalog import ModelEntry

DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY = "wss://gateway.discord.gg/"


class Settings(BaseSettings):
    # Empty values count as unset, so a copied .env.example with blank lines for secrets loads.
    model_config = SettingsConfigDict(env_prefix="IMAGINE_", env_file=".env", extra="ignore",
                                      env_ignore_empty=True)

    # Discord. Secrets never appear in reprs or logs (SecretStr).
    discord_token: SecretStr | None = None
    application_id: int | None = None
    discord_api_base: str = DISCORD_API_BASE
    discord_gateway_url: str = DISCORD_GATEWAY
    sync_guild_id: int | None = Field(
        default=None, description="Sync commands to this guild only (instant); global when unset."
    )

    # Redis / RQ.
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_prefix: str = "imagine"
    # A job that cannot start before the interaction token (15 min) expires is never started.
    queue_ttl_s: int = 600
    # How often the bot cancels (and tells the users of) jobs older than queue_ttl_s.
    expiry_sweep_s: float = 30.0
    # Back-pressure (core.queue): a command is answered "busy, try later" at once when its
    # model's queue holds this many jobs, or when its server (the web: all web clients) already
    # has this share of that depth waiting; besides, always, when the work ahead could not finish
    # before the job would expire.
    queue_max_depth: int = Field(default=300, ge=1)
    tenant_max_share: float = Field(default=0.25, gt=0, le=1)
    # Per-user limits in every server whose admins set none (they can tighten or loosen them
    # with /imagine-admin limits): jobs queued or running at once, and commands per window.
    default_max_active_jobs: int = Field(default=3, ge=0)  # 0: no limit
    default_rate_count: int = Field(default=10, ge=0)  # 0: no limit
    default_rate_window_s: int = Field(default=60, ge=1)
    job_timeout_s: int = 300
    result_ttl_s: int = 3600
    # Failed jobs stay visible to operators (RQ's failed registry) this long; the record that a
    # user was told about a job lives a day longer, so a failure is never reported twice.
    failure_ttl_s: int = 7 * 24 * 3600
    # The bot gives Redis this long per command before answering "queue unavailable" (Discord
    # allows 3 s for the first answer).
    redis_timeout_s: float = 1.0

    # Models: built-in catalog plus operator overrides/additions (JSON in IMAGINE_MODELS).
    models: dict[str, dict] = Field(default_factory=dict)
    default_model: str = "bk-sdm-small"

    # Worker.
    worker_models: list[str] = Field(default_factory=lambda: ["bk-sdm-small"])
    device: str = "auto"  # "auto" → cuda when available, else cpu
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    warmup: bool = True
    # Speed. All are safe defaults on GPU and no-ops on CPU.
    max_batch_images: int = Field(default=8, ge=1, description="images per pipeline call when batching")
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    # Shapes warmed (compiled, CUDA graphs captured) at start when compiling. Unset batch sizes:
    # every count from 1 to max_batch_images, so batching never meets an uncompiled shape.
    compile_batch_sizes: list[int] | None = None
    compile_sizes: list[int] = Field(default_factory=list)  # image sizes beyond each model's native one
    gpu_memory_budget_gb: float | None = None  # None: keep every served model on the GPU
    starvation_s: float = 20.0  # a job for a model not on the GPU waits at most this before a swap
    # Output moderation (worker.safety): one classifier for every model, loaded at worker start
    # like the pipelines (hub id or local folder, pinned revision). The folder holds
    # ``safety_checker/`` (diffusers' StableDiffusionSafetyChecker) and ``feature_extractor/``
    # (its CLIPImageProcessor), as the SD 1.x repositories ship them.
    safety_source: str = "CompVis/stable-diffusion-v1-4"
    safety_revision: str | None = "133a221b8aa7292a167afc5127cb63fb5005638b"  # ignored for a folder
    # An image is flagged when its highest concept score exceeds this. Scores are the checker's
    # own (cosine similarity minus each concept's published threshold): 0.0 is the published
    # decision; lower is stricter (-0.02 catches borderline images), higher is laxer.
    safety_threshold: float = 0.0

    # Web front end (Gradio) and operations. A metrics port of 0 turns that endpoint off.
    web_host: str = "127.0.0.1"
    web_port: int = 7860
    # The web applies this Discord server's policy (set with /imagine-admin); unset: defaults.
    web_policy_guild_id: int | None = None
    # Web users are anonymous: limits per client address and in total (0: no limit).
    web_max_active_per_client: int = Field(default=2, ge=0)
    web_rate_count: int = Field(default=10, ge=0)  # jobs per web_rate_window_s, per client
    web_rate_window_s: int = Field(default=60, ge=1)
    web_max_queued: int = Field(default=50, ge=0)  # web jobs queued or running at once
    # Behind a reverse proxy the client is the proxy: name the header it sets (its last entry,
    # the one the proxy added, is used). Trust it only when the port is not reachable otherwise.
    web_client_header: str | None = None
    bot_metrics_port: int = 9101
    worker_metrics_port: int = 9102
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # Liveness: while a job runs, a thread renews its started-job entry every heartbeat, with a
    # lease of 4 heartbeats; a dead worker's job is retried once the lease runs out and any
    # worker's maintenance (every maintenance_interval_s) finds it.
    heartbeat_s: int = 5
    maintenance_interval_s: int = 15
    # How long an idle worker blocks on its queues between heartbeats/maintenance.
    idle_poll_s: int = 10
    # A worker rides through Redis outages up to about this long before restarting its loop.
    redis_retry_s: float = 30.0

    # Experience: progress edits, previews, ETAs, result buttons.
    progress_interval_s: float = Field(
        default=1.5, description="At most one edit of a user's message per this many seconds.")
    progress_preview: bool = False  # attach a tiny latent preview to progress edits
    record_ttl_s: int = 7 * 24 * 3600  # how long result buttons keep working
    latency_samples: int = 200  # recent jobs per model kept for p50/p95 and ETAs
    eta_min_samples: int = 3  # no ETA is shown before this many jobs have run on a model
    queue_refresh_jobs: int = 10  # queued messages whose position is refreshed as jobs start
    variations_count: int = 4  # images made by the Variations button (capped by max_count)

    # Limits applied to every command (server policies can only tighten them).
    max_prompt_chars: int = 500
    max_steps: int = 50
    max_count: int = Field(default=4, ge=1, le=10)  # Discord takes 10 attachments per message
    max_guidance: float = 20.0
    # A server's forced negative prompt is read only through classifier-free guidance, which
    # diffusers runs at guidance > 1 and which weighs the negative by (guidance - 1): jobs in such
    # a server run at least this guidance (raised with a note, or refused, as the server chose).
    forced_negative_min_guidance: float = Field(default=2.0, gt=1)
    min_size: int = 256
    max_size: int = 1024
    default_negative_prompt: str = (
        "ugly, poorly rendered face, low resolution, poorly drawn feet, poorly drawn face, "
        "out of frame, extra limbs, disfigured, deformed, body out of frame, blurry, "
        "bad composition, blurred, watermark, grainy, signature, cut off, mutation"
    )

    def catalog(self) -> dict[str, ModelEntry]:
        from settings.catalog import build_catalog

        return build_catalog(self.models)

    def require_discord(self) -> tuple[str, int]:
        """Token and application id, or a one-line error for the CLI."""
        if self.discord_token is None or self.application_id is None:
            raise SystemExit(
                "error: set IMAGINE_DISCORD_TOKEN and IMAGINE_APPLICATION_ID (see README, Configuration)"
            )
        return self.discord_token.get_secret_value(), self.application_id


def load_settings() -> Settings:
    """The environment's settings for an entry point, or exit with one line naming what is wrong
    (never a traceback)."""
    try:
        settings = Settings()
    except ValidationError as error:
        first = error.errors()[0]
        name = "IMAGINE_" + "_".join(str(part) for part in first["loc"]).upper()
        raise SystemExit(f"error: {name}: {first['msg']}") from None
    except SettingsError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        settings.catalog()
    except ValidationError as error:
        first = error.errors()[0]
        raise SystemExit(f"error: IMAGINE_MODELS: {first['msg']} ({'.'.join(map(str, first['loc']))})") from None
    return settings
