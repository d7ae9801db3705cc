"""Runtime configuration, read from the environment (prefix ``IMAGINE_``) or a ``.env`` file.

One :class:`Settings` object is built at each entry point and passed down; no module reads the
environment on its own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from settings.catalog import ModelEntry

DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY = "wss://gateway.discord.gg/"
SECRETS_DIR = "/run/secrets"


def _secrets_dir() -> str | None:
    """Docker's secrets folder when there is one (pydantic-settings warns about a missing one)."""
    return SECRETS_DIR if os.path.isdir(SECRETS_DIR) else None


class Settings(BaseSettings):
    # Empty values count as unset, so a copied .env.example with blank lines for secrets loads.
    # Secrets can also be files named like the variable, lower case, in /run/secrets (Docker
    # secrets: e.g. /run/secrets/imagine_redis_password); an environment variable wins over a file.
    model_config = SettingsConfigDict(env_prefix="IMAGINE_", env_file=".env", extra="ignore",
                                      env_ignore_empty=True, secrets_dir=_secrets_dir())

    # Discord. Secrets never appear in reprs or logs (SecretStr).
    discord_token: SecretStr | None = None
    application_id: int | None = None
    discord_api_base: str = DISCORD_API_BASE
    discord_gateway_url: str = DISCORD_GATEWAY
    sync_guild_id: int | None = Field(
        default=None, description="Sync commands to this guild only (instant); global when unset."
    )
    # Sharding (discord.py's AutoShardedClient). shard_count unset: the count Discord recommends
    # (GET /gateway/bot), every shard in this process. To split the shards over N processes (or
    # hosts), give each the same shard_count and its own shard_ids ("0,1" or "[0, 1]"); every
    # shard id must run in exactly one process. README, "Sharding".
    shard_count: int | None = Field(default=None, ge=1)
    shard_ids: Annotated[list[int] | None, NoDecode] = None
    # discord.py waits this long between two IDENTIFYs of one process (Discord allows one per
    # 5 s per max_concurrency bucket).
    shard_identify_delay_s: float = Field(default=5.0, ge=0)
    # One bot process at a time syncs the command tree and runs the expiry sweep (core.lease):
    # a dead holder's role is taken over within about this long.
    lease_ttl_s: float = Field(default=30.0, gt=0)
    # Threads for the bot's blocking Redis work (each command's admission and enqueue wait on
    # Redis round trips there); Python's default, CPUs + 4, caps the ack rate on small hosts.
    bot_threads: int = Field(default=32, ge=1)

    # Redis / RQ.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis connection (core.redis_connection, one factory for bot, worker and web). TLS: a
    # rediss:// URL or redis_tls, with the CA file and certificate check below. Credentials in
    # the URL win over these. Sentinel mode (redis_sentinels set): the
    # sentinels ("host:port") name the current primary of redis_sentinel_master, and every
    # client follows a failover; redis_url then only gives the database number.
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_tls: bool = False  # TLS even with a redis:// URL; sentinel mode: to the sentinels too
    redis_tls_ca_file: str | None = None
    redis_tls_cert_reqs: Literal["required", "optional", "none"] = "required"
    redis_tls_certfile: str | None = None  # client certificate (mutual TLS), with its key
    redis_tls_keyfile: str | None = None
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "imagine"
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own (requirepass)
    # Sentinel mode: after enqueueing, wait until this many replicas have the job (Redis WAIT)
    # before answering "Queued"; 0: do not wait (a hard kill of the primary may lose the last
    # second of accepted jobs). See docs/operations.md, "Redis Sentinel and failover".
    redis_min_replicas_ack: int = Field(default=0, ge=0)
    redis_replica_ack_timeout_ms: int = Field(default=500, ge=1)
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
    # Hugging Face token for gated or private weights (workers only; handed to the hub client as
    # HF_TOKEN). A secret: scrubbed from logs like the bot token.
    hf_token: SecretStr | None = None

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
    # With compile: the scheduler step as one compiled kernel, computed from the scheduler's own
    # step without its per-step wait for the GPU (worker.fused_step). Same latents within float
    # rounding; false keeps diffusers' step.
    fused_step: bool = True
    # UNet quantization for every model this worker serves (worker.quantize); "catalog": each
    # model's own ``quantize`` field. A mode the GPU lacks (fp8 below compute capability 8.9)
    # stops the worker at start with one line.
    quantize: Literal["catalog", "none", "fp8", "int8", "auto"] = "catalog"
    # Shapes warmed (compiled, CUDA graphs captured) at start when compiling. Unset batch sizes:
    # every count from 1 to max_batch_images, so batching never meets an uncompiled shape.
    compile_batch_sizes: list[int] | None = None
    # With compile: the UNet's batch dimension dynamic from the first call (worker.optimize), one
    # graph for every batch size instead of one for the first and another for the rest.
    compile_dynamic_batch: bool = True
    compile_sizes: list[int] = Field(default_factory=list)  # image sizes beyond each model's native one
    # torch.compile's caches (worker.compile_cache): a restarted compiled worker loads its graphs
    # from here instead of compiling every shape again. None: torch's default under /tmp, which a
    # container restart loses. docker/compose.yaml mounts a volume here.
    compile_cache_dir: Path | None = None
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
    # Upscale ×2 with a dedicated upscaler (worker.upscaler; off when unset): a hub id or local
    # folder of a StableDiffusionLatentUpscalePipeline, e.g. "stabilityai/sd-x2-latent-upscaler"
    # (pin upscaler_revision to a hub commit), loaded once at start. It serves SD 1.x-family models
    # (their VAE latent space); SDXL-family models keep the tiled img2img upscale.
    upscaler_source: str | None = None
    upscaler_revision: str | None = None  # ignored for a folder

    # Web front end (Gradio) and operations. A metrics port of 0 turns that endpoint off.
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=7860, ge=1, le=65535)
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
    bot_metrics_port: int = Field(default=9101, ge=0, le=65535)  # 0: off
    worker_metrics_port: int = Field(default=9102, ge=0, le=65535)
    # Where the bot's and workers' /metrics + /healthz and the web's /healthz listen: loopback
    # unless set (compose sets 0.0.0.0 inside the containers and publishes none of them).
    metrics_host: str = "127.0.0.1"
    web_health_port: int = Field(default=7861, ge=0, le=65535)  # the web's /healthz (Redis reachable); 0: off
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
    # Recycling (worker --max-jobs): a worker that reached its job count exits only once another
    # ready worker serves each of its models (else it keeps serving and checks after each job),
    # so a recycle never leaves a model without a worker for the minutes a start takes.
    # false: recycle regardless (a lone worker's model waits for its restart).
    recycle_needs_peer: bool = True

    # Experience: progress edits, previews, ETAs, result buttons.
    progress_interval_s: float = Field(
        default=1.5, description="At most one edit of a user's message per this many seconds.")
    progress_preview: bool = False  # attach a tiny latent preview to progress edits
    # What draws that preview: the model's tiny autoencoder (catalog tiny_vae_source, TAESD: a
    # real decode) or the linear latent→RGB projection (no model). A model without a tiny
    # autoencoder, or whose one failed to load (one log line at start), gets the projection.
    progress_preview_decoder: Literal["tiny-vae", "latent"] = "tiny-vae"
    # Final images decoded by the tiny autoencoder instead of the full VAE: a faster decode,
    # visibly less detail (opt-in; docs/operations.md, "Fast decode and previews"). Image input
    # still encodes with the full VAE; Upscale ×2 decodes with it too.
    fast_decode: bool = False
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
    # Image dimensions and image input (issue 14). Width and height are multiples of 64, each
    # side at least min_size and at most max_size; a job's pixels (width × height) at most
    # max_pixels (an Upscale ×2 output: max_upscale_pixels, sides up to 2 × max_size). Server
    # caps (/imagine-admin caps) can only lower max_pixels.
    min_size: int = 256
    max_size: int = 2048  # per side
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    max_upscale_pixels: int = Field(default=2048 * 2048, ge=64 * 64)
    # Source images (img2img, Vary, Upscale): the worker downloads an attachment itself, only
    # from Discord's CDN for the configured API (attachment_hosts, "host" or "host:port",
    # replaces that list), with this timeout and byte limit; it decodes nothing over
    # source_max_pixels (checked from the header, before any decode).
    attachment_hosts: list[str] = Field(default_factory=list)
    source_max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    source_max_pixels: int = Field(default=40_000_000, ge=64 * 64)
    source_timeout_s: float = Field(default=10.0, gt=0)
    default_negative_prompt: str = (
        "ugly, poorly rendered face, low resolution, poorly drawn feet, poorly drawn face, "
        "out of frame, extra limbs, disfigured, deformed, body out of frame, blurry, "
        "bad composition, blurred, watermark, grainy, signature, cut off, mutation"
    )

    @field_validator("discord_token", "hf_token", "redis_password", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        """An empty secret file (``make secrets`` writes empty token files to fill in) is no secret."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """A URL redis-py can open, checked at start (not at the first command, minutes later in
        a worker that loads its models first). The password in it is never echoed."""
        parsed = urlsplit(value)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        try:
            parsed.port  # noqa: B018 - raises for a port that is not a number in range
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
        return value  # no host is fine: localhost, or (with sentinels) only the database number

    @field_validator("*")
    @classmethod
    def _no_nan(cls, value: object) -> object:
        """NaN compares false with everything: as a threshold, cap or floor it would switch the
        check it sets off silently (IMAGINE_SAFETY_THRESHOLD=nan passes every image)."""
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("must be a number, not NaN")
        return value

    @field_validator("shard_ids", "redis_sentinels", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """A JSON list, or items separated by commas ("0,1"; "h1:26379,h2:26379")."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()] or None

    @field_validator("shard_ids")
    @classmethod
    def _shards_known(cls, value: list[int] | None, info) -> list[int] | None:
        count = info.data.get("shard_count")
        if value is not None:
            if count is None:
                raise ValueError("shard_ids needs shard_count (the total over every bot process)")
            if len(set(value)) != len(value) or not all(0 <= shard < count for shard in value):
                raise ValueError(f"shard ids must be distinct, from 0 to shard_count - 1 ({count - 1})")
        return value

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
