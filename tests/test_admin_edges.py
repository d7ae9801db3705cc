"""Per-server moderation from Discord (issue 3) at its edges: a prompt cannot stall the matcher,
the default model is always one the server allows (Discord and the web page alike), the banned
list and the audit view show everything an admin needs, admin text cannot break its code span,
and admin autocomplete answers admins only. Fast: no GPU, no service processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from redis import Redis

from core import policy_edits as edits
from core.policy import GuildPolicy, apply_policy
from core.policy_store import Actor, PolicyStore
from core.validation import ImagineOptions
from settings.catalog import build_catalog
from settings.config import Settings
from tests.support.fake_discord import snowflake

GUILD, CHANNEL, ADMIN, MEMBER = 7, 9, 1, 42
CATALOG = build_catalog()


def services_for(redis_url: str):
    from bot.services import Services
    from core.queue import JobQueue
    from core.user_settings import UserSettingsStore

    prefix = f"audit4{snowflake()[-6:]}"
    settings = Settings(_env_file=None, redis_url=redis_url, queue_prefix=prefix)
    jobs = JobQueue(Redis.from_url(redis_url), settings)
    return Services(settings=settings, catalog=CATALOG, jobs=jobs,
                    policies=PolicyStore(jobs.redis, prefix, jobs.job_lifetime_s()),
                    user_settings=UserSettingsStore(jobs.redis, prefix))


class Response:
    def __init__(self):
        self.sent: list[dict] = []

    def is_done(self) -> bool:
        return bool(self.sent)

    async def send_message(self, content=None, **kwargs):
        self.sent.append({"content": content, **kwargs})

    async def autocomplete(self, choices):
        self.sent.append({"choices": list(choices)})


def interaction(services, *, user_id: int = ADMIN, manage_guild: bool = True, guild_id: int | None = GUILD):
    return SimpleNamespace(client=SimpleNamespace(services=services), user=SimpleNamespace(id=user_id),
                           guild_id=guild_id, channel_id=CHANNEL, id=5, application_id=1, token="tok",
                           permissions=SimpleNamespace(manage_guild=manage_guild), response=Response(),
                           followup=SimpleNamespace(send=Response().send_message), command=None)


# -- 1. banned terms: a member's prompt stalls the bot (regex backtracking) ---------------------
def test_a_prompt_cannot_stall_the_matcher_with_a_run_of_repeated_letters():
    """A term with repeated letters ("xxxx") is one repeating class per letter: a prompt of one
    long run of that letter glued to another letter must not make it try every split of the run
    (it once took 82 s for 500 characters, holding the bot's or the web's GIL)."""
    code = ("from core.matcher import find_banned;"
            "print(find_banned('x' * 499 + 'a', ('xxxx',)))")
    try:
        subprocess.run([sys.executable, "-c", code], timeout=5, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("find_banned took more than 5 s on one 500-character prompt")


# -- 2. models: the effective default model must be an allowed one ------------------------------
def test_denying_the_operators_default_model_leaves_imagine_usable_without_a_model():
    settings = Settings(_env_file=None)
    policy = edits.deny_model(GuildPolicy(), settings.default_model, CATALOG)
    # "/imagine prompt:a fox" (no model): the server allows three models, it must use one of them.
    request = apply_policy(ImagineOptions("a fox"), policy, job_id="j", settings=settings, catalog=CATALOG).request
    assert request.model in policy.allowed_models


def test_allowing_a_model_keeps_the_servers_default_usable():
    settings = Settings(_env_file=None)
    policy = edits.set_default_model(GuildPolicy(), "ssd-1b", CATALOG)  # every model allowed
    policy = edits.allow_model(policy, "sd-v1-4", CATALOG)  # now only sd-v1-4
    request = apply_policy(ImagineOptions("a fox"), policy, job_id="j", settings=settings, catalog=CATALOG).request
    assert request.model in policy.allowed_models


# -- 3. banned list at the limit ------------------------------------------------------------------
def test_banned_list_shows_every_term_at_the_limit(redis_server):
    """``/imagine-admin banned list`` shows every term at the cap (200), none cut in half."""
    from bot.commands import admin

    services = services_for(redis_server.url)
    terms = tuple(f"term{i:03d}" for i in range(edits.MAX_TERMS))
    services.jobs.redis.set(services.policies.policy_key(GUILD), GuildPolicy(banned_terms=terms).model_dump_json())
    asked = interaction(services)
    asyncio.run(admin.banned_list.callback(asked))
    shown = "\n".join(str(m.get("content") or "") for m in asked.response.sent + [])
    missing = [t for t in terms if t not in shown]
    assert not missing or re.search(r"\b%d\b" % len(missing), shown), (
        f"{len(missing)} banned terms silently left out of the list")


# -- 4. audit view: old → new of a long value -----------------------------------------------------
def test_audit_shows_the_new_value_of_a_long_forced_negative(redis_server):
    """After replacing a 400-character forced negative prompt, the audit view shows the new
    text too (old and new are clipped each on its own)."""
    from bot.policy_render import audit_text

    services = services_for(redis_server.url)
    store = services.policies
    for text in ("old " * 100, "NEWTEXT " + "n" * 50):
        store.update(GUILD, Actor(ADMIN, "admin"), "forced negative set",
                     lambda p, t=text: edits.changed_fields(p, edits.set_forced_negative(p, t, 500)))
    assert "NEWTEXT" in audit_text(store.audit(GUILD, 1))


# -- 5. audit view: user text breaks out of its code span -----------------------------------------
def test_audit_values_cannot_inject_markdown_or_mentions(redis_server):
    from bot.policy_render import audit_text

    services = services_for(redis_server.url)
    store = services.policies
    text = "x` <@&123456789> **FORGED** `y"
    store.update(GUILD, Actor(ADMIN, "admin"), "forced negative set",
                 lambda p: edits.changed_fields(p, edits.set_forced_negative(p, text, 500)))
    rendered = audit_text(store.audit(GUILD, 1))
    outside_code = re.sub(r"(`+)(.+?)\1", "", rendered)
    assert "<@&123456789>" not in outside_code and "**FORGED**" not in outside_code, rendered


# -- 6. admin autocomplete answers members without Manage Server ----------------------------------
def test_admin_model_autocomplete_is_not_open_to_members(redis_server):
    """discord.py runs no group ``interaction_check`` for autocomplete: ``/imagine-admin models
    allow model:`` must answer a member without Manage Server (or a DM) with nothing."""
    from bot.commands import admin

    services = services_for(redis_server.url)
    member = interaction(services, user_id=MEMBER, manage_guild=False)
    asyncio.run(admin.models_allow._invoke_autocomplete(member, "model", SimpleNamespace(model="")))
    offered = [c for m in member.response.sent for c in m.get("choices", [])]
    assert offered == []


# -- 7. web: the server's model policy does not reach the page's defaults -------------------------
def test_the_web_pages_untouched_form_obeys_the_servers_model_policy(redis_server):
    """With the web's policy server allowing only ``sd-v1-4`` (its default), the untouched web form
    runs on sd-v1-4, as Discord's ``/imagine`` without a model does (the dropdown's value is read
    at each page load, not fixed at start)."""
    import gradio as gr

    from web.app import build_ui
    from web.jobs import WebJobs

    prefix = f"audit4w{snowflake()[-6:]}"
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=prefix, web_policy_guild_id=GUILD)
    redis = Redis.from_url(redis_server.url)
    PolicyStore(redis, prefix).update(GUILD, Actor(ADMIN, "admin"), "models", lambda p: {
        "allowed_models": ("sd-v1-4",), "default_model": "sd-v1-4"})
    jobs = WebJobs(redis, settings)
    ui = build_ui(jobs)
    dropdown = next(b for b in ui.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Model")
    model = dropdown.value() if callable(dropdown.value) else dropdown.value
    entry = jobs.catalog.get(model) or jobs.catalog[settings.default_model]
    request, _, _ = jobs.submit(ImagineOptions("a fox", model=model or None, steps=entry.default_steps,
                                               guidance=entry.default_guidance))
    assert request.model == "sd-v1-4"
