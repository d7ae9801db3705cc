"""A local Discord-compatible server for tests and benchmarks: REST + gateway on 127.0.0.1.

It speaks just enough of Discord's documented API for discord.py's real code paths: login
(``GET /users/@me``), command sync, the gateway handshake (HELLO → IDENTIFY → READY,
heartbeats), interaction callbacks, webhook follow-ups (JSON or multipart with files), message
edits and channel messages. Everything received is recorded for assertions, and failures (429,
5xx, expired tokens) can be injected per route. Attachments (users' files registered with
:meth:`FakeDiscord.attachment`, and every file the bot or a worker posts) are served like
Discord's CDN, under signed URLs (``ex``, ``is``, ``hm``) that expire (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

BOT_USER = {"id": "900000000000000001", "username": "imagine", "discriminator": "0",
            "global_name": "Imagine", "avatar": None, "bot": True}
_snowflakes = itertools.count(int(time.time() * 1000 - 1420070400000) << 22)


def snowflake() -> str:
    return str(next(_snowflakes))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Posted:
    """One message that reached the fake Discord (follow-up, channel post or edit)."""

    kind: str  # "followup" | "channel" | "edit" | "callback" | "rejected" (over Discord's limits)
    key: str  # interaction token, or channel id for channel posts
    payload: dict[str, Any]
    files: list[tuple[str, bytes]] = field(default_factory=list)
    message_id: str = ""
    at: float = field(default_factory=time.time)
    message: dict[str, Any] = field(default_factory=dict)  # the message object answered, if any


@dataclass
class CdnFile:
    """One attachment the fake CDN serves, under a signed URL (``ex``, ``is``, ``hm``)."""

    data: bytes
    content_type: str | None
    expires_at: float
    issued_at: float = field(default_factory=time.time)

    @property
    def ex(self) -> str:
        return f"{int(self.expires_at):x}"

    def signature(self, path: str) -> str:
        return hashlib.sha256(f"{path}:{int(self.expires_at):x}:{int(self.issued_at):x}".encode()).hexdigest()

    def query(self, path: str) -> str:
        return f"ex={self.ex}&is={int(self.issued_at):x}&hm={self.signature(path)}&"


def _cdn_path(url: str) -> str:
    return urlsplit(url).path


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    """What Discord reports for an uploaded file: width and height when it is an image."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None, None


class FakeDiscord:
    def __init__(self) -> None:
        self.posts: list[Posted] = []
        self.synced_commands: list[dict] = []
        self.expired_tokens: set[str] = set()
        self.failures: list[tuple[str, int]] = []  # (kind, status) consumed in order
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._nonces: dict[tuple[str, str], dict] = {}  # (channel, nonce) → the message it made
        self.identified = threading.Event()
        self.identify_count = 0  # IDENTIFYs received: a restarted bot identifies again
        # Sharding: what GET /gateway/bot recommends, each connection's [shard id, count] from its
        # IDENTIFY, how often the commands were synced, and when each interaction was sent.
        self.recommended_shards = 1
        self.shard_of: dict[web.WebSocketResponse, tuple[int, int]] = {}
        self.sync_count = 0
        self.dispatched_at: dict[str, float] = {}  # interaction token → time.time() it was sent
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.application_id = "1"
        self.cdn: dict[str, CdnFile] = {}  # path → a hosted attachment (see attachment())
        self.cdn_gets: list[tuple[str, int, str]] = []  # (path, status, user agent) of every CDN fetch

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeDiscord":
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("fake Discord did not start")
        return self

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.get("/api/v10/users/@me", self._me),
            web.get("/api/v10/oauth2/applications/@me", self._application),
            web.get("/api/v10/gateway", self._gateway_info),
            web.get("/api/v10/gateway/bot", self._gateway_info),
            web.put("/api/v10/applications/{app}/commands", self._sync),
            web.put("/api/v10/applications/{app}/guilds/{guild}/commands", self._sync),
            web.post("/api/v10/interactions/{id}/{token}/callback", self._callback),
            web.post("/api/v10/webhooks/{app}/{token}", self._followup),
            web.get("/api/v10/webhooks/{app}/{token}/messages/{message}", self._get_message),
            web.patch("/api/v10/webhooks/{app}/{token}/messages/{message}", self._edit),
            web.delete("/api/v10/webhooks/{app}/{token}/messages/{message}", self._delete),
            web.post("/api/v10/channels/{channel}/messages", self._channel_post),
            web.get("/gateway", self._gateway),
            web.get("/attachments/{channel}/{attachment}/{filename}", self._cdn_get),
        ])
        runner = web.AppRunner(app, access_log=None)  # a line per request is noise (and outlives pytest's capture)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self.loop.run_forever()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- queries for tests -------------------------------------------------------------------
    def messages(self, kind: str | None = None, key: str | None = None) -> list[Posted]:
        with self._lock:
            return [p for p in self.posts if (kind is None or p.kind == kind) and (key is None or p.key == key)]

    def answer(self, payload: dict, timeout: float = 10) -> dict:
        """Dispatch an interaction and return the bot's answer (:meth:`reply`)."""
        self.dispatch("INTERACTION_CREATE", payload)
        return self.reply(payload, timeout)

    def reply(self, payload: dict, timeout: float = 10) -> dict:
        """The bot's answer to an interaction: its callback's body; for one acknowledged first
        ("thinking", type 5), ``{"type": 5, "data": <the followup that answered it>}``."""
        deadline = time.monotonic() + timeout

        def first(kind: str) -> Posted:
            while not (posted := self.messages(kind, payload["token"])):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind} for interaction {payload['id']} within {timeout}s")
                time.sleep(0.05)
            return posted[0]

        callback = first("callback").payload
        return {"type": 5, "data": first("followup").payload} if callback["type"] == 5 else callback

    def results(self, token: str) -> list[Posted]:
        """Result messages of one command: the edit of its message that carries the embed."""
        return [p for p in self.messages("edit", token) if p.payload.get("embeds")]

    def final_edits(self, token: str) -> list[Posted]:
        """Edits that end a command's story: its result, or the bot's "⏳ queue unavailable" /
        "🚫 cancelled" notes (progress and position edits are not final)."""
        return [p for p in self.messages("edit", token)
                if p.payload.get("embeds") or (p.payload.get("content") or "").startswith(("⏳", "🚫"))]

    def outcomes(self, token: str, user_id: str) -> list[Posted]:
        """Everything that told a user how their command ended: the result edit, a failure (or
        cancel) follow-up, or either posted to the channel when the token had expired."""
        mention = f"<@{user_id}>"
        return (self.final_edits(token) + self.messages("followup", token)
                + [p for p in self.messages("channel") if mention in (p.payload.get("content") or "")])

    def fail_next(self, kind: str, *statuses: int) -> None:
        """Answer the next requests of ``kind`` ("followup", "channel", …) with these statuses."""
        with self._lock:
            self.failures.extend((kind, s) for s in statuses)

    # -- gateway -----------------------------------------------------------------------------
    def dispatch(self, event: str, data: dict, *, shard: int | None = None, wait: bool = True) -> None:
        """Send a gateway DISPATCH (op 0). As Discord does, an event of a guild goes only to the
        connection of that guild's shard, ``(guild_id >> 22) % shard_count``; ``shard`` sends it
        to that shard's connection instead (as after a re-shard); connections that identified
        without a shard get everything. ``wait=False``: do not wait until it is sent."""
        future = asyncio.run_coroutine_threadsafe(self._dispatch(event, data, shard), self.loop)
        if wait:
            future.result(5)

    def shard_for(self, guild_id: int | str, shard_count: int) -> int:
        return (int(guild_id) >> 22) % shard_count

    def connected_shards(self) -> list[tuple[int, int]]:
        return sorted(self.shard_of[s] for s in list(self._sockets) if s in self.shard_of and not s.closed)

    def ack_latency(self, token: str) -> float | None:
        """Seconds from sending the interaction to its callback's answer (None: none yet)."""
        answers = self.messages("callback", token)
        sent = self.dispatched_at.get(token)
        return None if not answers or sent is None else answers[0].at - sent

    async def _dispatch(self, event: str, data: dict, shard: int | None = None) -> None:
        frame = json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data})
        guild_id = data.get("guild_id") if isinstance(data, dict) else None
        targets = []
        for socket in list(self._sockets):
            if socket.closed:
                continue
            mine = self.shard_of.get(socket)
            if mine is not None and shard is not None and mine[0] != shard:
                continue
            if mine is not None and shard is None and guild_id is not None and \
                    self.shard_for(guild_id, mine[1]) != mine[0]:
                continue
            targets.append(socket)
        if event == "INTERACTION_CREATE" and isinstance(data, dict) and "token" in data:
            self.dispatched_at[data["token"]] = time.time()
        for socket in targets:
            await socket.send_str(frame)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame["op"] == 1:  # heartbeat
                await socket.send_str(json.dumps({"op": 11}))
            elif frame["op"] in (2, 6):  # identify / resume
                # The shard from IDENTIFY; a RESUME names it through its session id.
                shard = frame["d"].get("shard")
                session = str(frame["d"].get("session_id") or "")
                if shard is None and session.startswith("fake-session-"):
                    shard = [int(n) for n in session.rsplit("-", 2)[-2:]]
                if shard is not None:
                    self.shard_of[socket] = (int(shard[0]), int(shard[1]))
                self._sockets.append(socket)
                await socket.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": {
                    "v": 10, "user": BOT_USER, "guilds": [],
                    "session_id": f"fake-session-{shard[0]}-{shard[1]}" if shard else "fake-session",
                    "resume_gateway_url": self.gateway_url, "shard": list(shard or [0, 1]),
                    "application": {"id": frame["d"].get("application_id", "1"), "flags": 0},
                }}))
                self.identify_count += 1
                self.identified.set()
        if socket in self._sockets:
            self._sockets.remove(socket)
        self.shard_of.pop(socket, None)
        return socket

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url, "shards": self.recommended_shards,
                      "session_start_limit": {"total": 1000, "remaining": 1000,
                                              "reset_after": 0, "max_concurrency": 1}})

    # -- REST --------------------------------------------------------------------------------
    async def _me(self, request: web.Request) -> web.Response:
        return _json(BOT_USER)

    async def _application(self, request: web.Request) -> web.Response:
        return _json({"id": self.application_id, "name": "Imagine", "description": "", "icon": None,
                      "bot_public": True, "bot_require_code_grant": False, "owner": BOT_USER,
                      "verify_key": "0" * 64, "team": None, "flags": 0, "rpc_origins": []})

    async def _sync(self, request: web.Request) -> web.Response:
        commands = await request.json()
        app = request.match_info["app"]
        echoed = [{"id": snowflake(), "application_id": app, "version": snowflake(),
                   "default_member_permissions": None, "type": 1, "nsfw": False,
                   "options": [], **command} for command in commands]
        with self._lock:
            self.synced_commands = echoed
            self.sync_count += 1
        return _json(echoed)

    async def _callback(self, request: web.Request) -> web.Response:
        body = await request.json()
        token = request.match_info["token"]
        if (bad := _limits(body.get("data") or {})) is not None:
            self._record(Posted("rejected", token, body))
            return bad
        message = _message(body.get("data") or {}, channel_id="0")
        self._record(Posted("callback", token, body, message_id=message["id"], message=message))
        return _json({
            "interaction": {"id": request.match_info["id"], "type": 2,
                            "response_message_id": message["id"],
                            "response_message_loading": body["type"] == 5,
                            "response_message_ephemeral": bool((body.get("data") or {}).get("flags", 0) & 64)},
            "resource": {"type": body["type"], "message": message},
        })

    async def _followup(self, request: web.Request) -> web.Response:
        return await self._webhook_message(request, "followup")

    async def _get_message(self, request: web.Request) -> web.Response:
        """The interaction's original response as it stands: its last edit, else its callback's."""
        token = request.match_info["token"]
        if (failure := self._failure("get", token)) is not None:
            return failure
        if request.match_info["message"] == "@original":
            edits = [p for p in self.messages("edit", token) if p.message_id == "@original"]
            if edits and edits[-1].message is not None:
                return _json(edits[-1].message)
            callbacks = self.messages("callback", token)
            if callbacks and callbacks[0].payload.get("type") == 4:
                return _json(_message(callbacks[0].payload.get("data") or {}, channel_id="0"))
        return _json({"message": "Unknown Message", "code": 10008}, status=404)

    async def _edit(self, request: web.Request) -> web.Response:
        return await self._webhook_message(request, "edit", request.match_info["message"])

    async def _webhook_message(self, request: web.Request, kind: str, message_id: str | None = None,
                               ) -> web.Response:
        """A follow-up (new message) or an edit of one through the interaction's webhook."""
        token = request.match_info["token"]
        if (failure := self._failure(kind, token)) is not None:
            return failure
        payload, files = await _read_message(request)
        if (bad := _limits(payload)) is not None:
            self._record(Posted("rejected", token, payload))
            return bad
        message = _message(payload, channel_id="0", files=files)
        self._host_files(message, files)
        self._record(Posted(kind, token, payload, files, message_id or message["id"], message=message))
        return _json(message)

    async def _delete(self, request: web.Request) -> web.Response:
        self._record(Posted("delete", request.match_info["token"], {}, message_id=request.match_info["message"]))
        return web.Response(status=204)

    async def _channel_post(self, request: web.Request) -> web.Response:
        channel = request.match_info["channel"]
        if (failure := self._failure("channel", channel)) is not None:
            return failure
        payload, files = await _read_message(request)
        if (bad := _limits(payload)) is not None:
            self._record(Posted("rejected", channel, payload))
            return bad
        # Discord: with enforce_nonce, a repeat of a nonce by the same author within a few minutes
        # returns the first message and creates none (how a retried post stays single).
        nonce = payload.get("nonce") if payload.get("enforce_nonce") else None
        with self._lock:
            if nonce is not None and (channel, nonce) in self._nonces:
                return _json(self._nonces[(channel, nonce)])
            message = _message(payload, channel_id=channel, files=files)
            self._host_files(message, files)
            if nonce is not None:
                self._nonces[(channel, nonce)] = message
        self._record(Posted("channel", channel, payload, files, message["id"]))
        return _json(message)

    # -- CDN: attachments served as Discord's CDN does (signed URLs that expire) ------------
    def attachment(self, filename: str, data: bytes, content_type: str | None = "image/png", *,
                   width: int | None = None, height: int | None = None, detect: bool = True,
                   channel_id: str = "810000000000000001", ttl_s: float = 24 * 3600,
                   size: int | None = None) -> dict:
        """Host ``data`` as a user's attachment; returns Discord's attachment object for it, as
        in an interaction's ``data.resolved.attachments``. Discord sets ``width``/``height`` only
        for files it reads as images: by default they are read from the bytes (``detect``);
        pass them to claim something else. ``size``: the size Discord claims (default: real)."""
        if detect and width is None and height is None:
            width, height = _image_size(data)
        attachment_id = snowflake()
        url = self._cdn_url(channel_id, attachment_id, filename, data, content_type, ttl_s)
        return {"id": attachment_id, "filename": filename, "size": len(data) if size is None else size,
                "url": url, "proxy_url": url, "content_type": content_type, "width": width,
                "height": height, "ephemeral": True}

    def expire_attachment(self, url: str) -> None:
        """The signed URL's time is up: the CDN answers 404 from now on, as Discord's does."""
        self.cdn[_cdn_path(url)].expires_at = 0

    def cdn_fetches(self, url: str) -> list[tuple[str, int, str]]:
        return [got for got in self.cdn_gets if got[0] == _cdn_path(url)]

    def _cdn_url(self, channel_id: str, attachment_id: str, filename: str, data: bytes,
                 content_type: str | None, ttl_s: float) -> str:
        path = f"/attachments/{channel_id}/{attachment_id}/{filename}"
        hosted = CdnFile(data, content_type, time.time() + ttl_s)
        self.cdn[path] = hosted
        return f"http://127.0.0.1:{self.port}{path}?{hosted.query(path)}"

    def _host_files(self, message: dict, files: list[tuple[str, bytes]]) -> None:
        """The files of a message the bot or a worker posted, served from the CDN like users' own."""
        for attachment, (name, data) in zip(message["attachments"], files):
            kind = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
                    "webp": "image/webp"}.get(name.rsplit(".", 1)[-1].lower())
            width, height = _image_size(data)
            url = self._cdn_url(message["channel_id"], attachment["id"], name, data, kind, 24 * 3600)
            attachment.update(url=url, proxy_url=url, content_type=kind, width=width, height=height)

    async def _cdn_get(self, request: web.Request) -> web.Response:
        path = request.path
        hosted = self.cdn.get(path)
        agent = request.headers.get("User-Agent", "")
        if hosted is None or hosted.expires_at < time.time():
            status, response = 404, web.Response(status=404, text="This content is no longer available.")
        elif request.query.get("hm") != hosted.signature(path) or request.query.get("ex") != hosted.ex:
            status, response = 403, web.Response(status=403, text="Forbidden")
        else:
            status = 200
            response = web.Response(body=hosted.data, headers={
                "Content-Type": hosted.content_type or "application/octet-stream"})
        with self._lock:
            self.cdn_gets.append((path, status, agent))
        return response

    # -- helpers -----------------------------------------------------------------------------
    def _record(self, posted: Posted) -> None:
        with self._lock:
            self.posts.append(posted)

    def _failure(self, kind: str, token: str) -> web.Response | None:
        if token in self.expired_tokens:
            return _json({"message": "Unknown Webhook", "code": 10015}, status=404)
        with self._lock:
            index = next((i for i, (k, _) in enumerate(self.failures) if k == kind), None)
            if index is None:
                return None
            _, status = self.failures.pop(index)
        if status == 429:
            return _json({"message": "You are being rate limited.", "retry_after": 0.05, "global": False},
                         status=429, headers={"Retry-After": "0.05", "X-RateLimit-Scope": "user",
                                              # Discord's API answers carry this; discord.py treats a
                                              # 429 without it as a Cloudflare ban and does not retry.
                                              "Via": "1.1 google"})
        return _json({"message": "Server error", "code": 0}, status=status)


def _limits(payload: dict) -> web.Response | None:
    """Discord's documented limits on what a message or autocomplete answer may hold: over them,
    the real API answers 400 Invalid Form Body (50035), and so does this fake."""
    problems = []
    if len(payload.get("content") or "") > 2000:
        problems.append(f"content {len(payload['content'])} > 2000")
    for embed in payload.get("embeds") or []:
        if len(embed.get("description") or "") > 4096:
            problems.append(f"embed description {len(embed['description'])} > 4096")
        problems += [f"field value {len(f['value'])} > 1024" for f in embed.get("fields") or []
                     if len(f.get("value") or "") > 1024]
    choices = payload.get("choices") or []
    if len(choices) > 25 or any(len(c.get("name", "")) > 100 or len(str(c.get("value", ""))) > 100
                                for c in choices):
        problems.append("over 25 choices, or a choice over 100 characters")
    if not problems:
        return None
    error = {"code": "BASE_TYPE_MAX_LENGTH", "message": "; ".join(problems)}
    return _json({"message": "Invalid Form Body", "code": 50035, "errors": {"_errors": [error]}}, status=400)


def _json(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    # discord.py parses a body as JSON only for exactly "application/json" (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


async def _read_message(request: web.Request) -> tuple[dict, list[tuple[str, bytes]]]:
    if not request.content_type.startswith("multipart/"):
        return (await request.json() if request.can_read_body else {}), []
    payload: dict = {}
    files: list[tuple[str, bytes]] = []
    reader = await request.multipart()
    async for part in reader:
        if part.name == "payload_json":
            payload = json.loads(await part.text())
        else:
            files.append((part.filename or part.name or "", bytes(await part.read())))
    return payload, files


def _message(payload: dict, channel_id: str, files: list[tuple[str, bytes]] = ()) -> dict:
    message_id = snowflake()
    return {
        "id": message_id, "channel_id": channel_id, "type": 0, "author": BOT_USER,
        "content": payload.get("content") or "", "timestamp": now_iso(), "edited_timestamp": None,
        "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
        "embeds": payload.get("embeds") or [], "pinned": False, "flags": payload.get("flags", 0),
        "components": payload.get("components") or [],
        "attachments": [{"id": snowflake(), "filename": name, "size": len(data),
                         "url": f"https://cdn.invalid/{message_id}/{name}",
                         "proxy_url": f"https://cdn.invalid/{message_id}/{name}"}
                        for name, data in files],
    }


def slash_command(name: str, options: dict[str, Any], *, guild_id: str = "800000000000000001",
                  channel_id: str = "810000000000000001", user_id: str = "820000000000000001",
                  application_id: str = "1", permissions: str = "2147483647",
                  size_limit: int = 10 * 1024 * 1024, nsfw: bool = False,
                  attachments: dict[str, dict] | None = None) -> dict:
    """An INTERACTION_CREATE payload for a chat-input command, as Discord documents it.
    ``nsfw``: the channel is age-restricted (``channel.nsfw``). ``attachments``: ATTACHMENT
    options (type 11), by option name, each an attachment object (:meth:`FakeDiscord.attachment`):
    the option carries its id, ``data.resolved.attachments`` the object."""
    type_of = {str: 3, int: 4, bool: 5, float: 10}
    data = {"id": snowflake(), "name": name, "type": 1,
            "options": [{"name": k, "type": type_of[type(v)], "value": v} for k, v in options.items()]}
    if attachments:
        data["options"] += [{"name": k, "type": 11, "value": a["id"]} for k, a in attachments.items()]
        data["resolved"] = {"attachments": {a["id"]: a for a in attachments.values()}}
    return _interaction(2, data, guild_id=guild_id, channel_id=channel_id, user_id=user_id,
                        application_id=application_id, permissions=permissions, size_limit=size_limit,
                        nsfw=nsfw)


def subcommand(name: str, path: str, options: dict[str, Any], **where: Any) -> dict:
    """``/name <path…>`` with options, nested as Discord sends subcommands and groups (type 1 for
    the leaf, 2 for a group); ``where`` as for :func:`slash_command`."""
    payload = slash_command(name, options, **where)
    leaf = payload["data"]["options"]
    for part in reversed(path.split()):
        leaf = [{"name": part, "type": 1 if leaf is payload["data"]["options"] else 2, "options": leaf}]
    payload["data"]["options"] = leaf
    return payload


# Permission bits (https://discord.com/developers/docs/topics/permissions)
MANAGE_GUILD = 1 << 5
MEMBER_PERMISSIONS = str((1 << 10) | (1 << 11))  # view channel + send messages: no admin bits


def component_interaction(custom_id: str, message: dict[str, Any], *, values: list[str] | None = None,
                          user_id: str = "820000000000000001", permissions: str = MEMBER_PERMISSIONS,
                          **where: Any) -> dict:
    """An INTERACTION_CREATE payload for a click on a message component (type 3,
    MESSAGE_COMPONENT): a button, or a string select when ``values`` is given. ``message`` is
    the message object the component sits on, as Discord sends it."""
    data: dict[str, Any] = {"custom_id": custom_id, "component_type": 2 if values is None else 3}
    if values is not None:
        data["values"] = values
    payload = _interaction(3, data, user_id=user_id, permissions=permissions, **where)
    payload["message"] = {**message, "channel_id": payload["channel_id"]}
    return payload


def modal_submit(modal: dict[str, Any], values: dict[str, str], *, message: dict[str, Any] | None = None,
                 user_id: str = "820000000000000001", permissions: str = MEMBER_PERMISSIONS,
                 **where: Any) -> dict:
    """An INTERACTION_CREATE payload for a submitted modal (type 5, MODAL_SUBMIT). ``modal``: the
    modal the bot sent (the ``data`` of its type 9 callback); every text input comes back with
    its value, ``values[custom_id]`` where given, else the value it was pre-filled with, nested
    as it was sent (in a Label, type 18, or an action row, type 1). ``message``: the message
    whose component opened the modal."""
    def answered(component: dict) -> dict:
        if component.get("type") == 4:
            custom_id = component["custom_id"]
            return {"type": 4, "id": component.get("id", 0), "custom_id": custom_id,
                    "value": values.get(custom_id, component.get("value") or "")}
        if component.get("type") == 18:
            return {"type": 18, "id": component.get("id", 0), "component": answered(component["component"])}
        if component.get("type") == 1:
            return {"type": 1, "id": component.get("id", 0),
                    "components": [answered(c) for c in component.get("components", [])]}
        return {"type": component.get("type"), "id": component.get("id", 0)}

    data = {"custom_id": modal["custom_id"], "components": [answered(c) for c in modal.get("components", [])]}
    payload = _interaction(5, data, user_id=user_id, permissions=permissions, **where)
    if message is not None:
        payload["message"] = {**message, "channel_id": payload["channel_id"]}
    return payload


def _interaction(kind: int, data: dict[str, Any], *, guild_id: str = "800000000000000001",
                 channel_id: str = "810000000000000001", user_id: str = "820000000000000001",
                 application_id: str = "1", permissions: str = "2147483647",
                 size_limit: int = 10 * 1024 * 1024, nsfw: bool = False) -> dict:
    user = {"id": user_id, "username": f"user{user_id[-4:]}", "discriminator": "0",
            "global_name": None, "avatar": None}
    return {
        "id": snowflake(), "application_id": application_id, "type": kind, "token": f"tok-{snowflake()}",
        "version": 1, "guild_id": guild_id, "channel_id": channel_id,
        "channel": {"id": channel_id, "type": 0, "guild_id": guild_id, "name": "general",
                    "position": 0, "permission_overwrites": [], "nsfw": nsfw, "parent_id": None},
        "member": {"user": user, "roles": [], "joined_at": now_iso(), "deaf": False, "mute": False,
                   "flags": 0, "pending": False, "nick": None, "avatar": None, "permissions": permissions},
        "data": data,
        "locale": "en-US", "guild_locale": "en-US", "app_permissions": "2147483647",
        "entitlements": [], "authorizing_integration_owners": {"0": guild_id}, "context": 0,
        "attachment_size_limit": size_limit,
    }
