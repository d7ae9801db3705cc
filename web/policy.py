"""The policy the web front end applies: the same moderation path as Discord commands.

Web users are anonymous, so the per-user limits do not apply; the policy of the Discord
server named by ``IMAGINE_WEB_POLICY_GUILD_ID`` does (banned terms, forced and default negative
prompts, allowed models, caps), so admins moderate the web from Discord with ``/imagine-admin``.
"""

from __future__ import annotations

from core.admission import Requester
from settings.config import Settings

WEB_USER_ID = 0


def web_requester(settings: Settings) -> Requester:
    return Requester(user_id=WEB_USER_ID, guild_id=settings.web_policy_guild_id, channel_id=None,
                     exempt=True)
