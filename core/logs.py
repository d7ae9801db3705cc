"""Process-wide logging for every entry point: one line per record (JSON or text), the job id
when there is one, and secrets scrubbed from the final text — library log lines included.

Redaction works on the formatted text (message with its arguments, and the traceback) so that a
library that puts a webhook URL in an exception message (requests does) cannot leak the
interaction token it contains.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from settings.config import Settings

# An interaction token is the path segment after the id in webhook and interaction-callback URLs.
WEBHOOK_TOKEN = re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/?\s\"']+")
# A token field in a logged payload or repr: "token": "…", 'interaction_token': '…', token=…
TOKEN_FIELD = re.compile(r"""((?:interaction_)?token["']?\s*[:=]\s*["']?)[^"',\s)}]+""", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    text = WEBHOOK_TOKEN.sub(r"\1" + REDACTED, text)
    text = TOKEN_FIELD.sub(r"\1" + REDACTED, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class JobIdFilter(logging.Filter):
    """Adds ``job_id`` to records that lack one, from ``current_job_id`` (the worker's RQ job)."""

    def __init__(self, current_job_id: Callable[[], str | None]):
        super().__init__()
        self.current_job_id = current_job_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = self.current_job_id()
        return True


class LineFormatter(logging.Formatter):
    """One line per record: JSON for collectors, or readable text; secrets redacted."""

    def __init__(self, service: str, json_lines: bool, secrets: Iterable[str] = ()):
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.service = service
        self.json_lines = json_lines
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, "job_id", None)
        if not self.json_lines:
            text = super().format(record) + (f" [job {job_id}]" if job_id else "")
            return redact(text, self.secrets)
        line = {"ts": round(record.created, 3), "level": record.levelname, "service": self.service,
                "logger": record.name, "msg": redact(record.getMessage(), self.secrets)}
        if job_id:
            line["job_id"] = job_id
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return json.dumps(line, ensure_ascii=False)


# Libraries that may install handlers of their own (transformers and diffusers do, at import):
# their lines go through the one redacting formatter instead.
LIBRARY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "rq", "urllib3", "requests",
                   "discord", "gradio", "httpx", "uvicorn", "uvicorn.error", "asyncio", "filelock")
# Periodic maintenance lines of RQ (every idle poll or maintenance run): DEBUG, not INFO.
MAINTENANCE = re.compile(r"cleaning registries|cleaning group registries|sent heartbeat|"
                         r"Acquired scheduler lock|\*\*\* Listening on")


class MaintenanceFilter(logging.Filter):
    """Demotes RQ's periodic maintenance lines to DEBUG (dropped unless the level is DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.startswith("rq") and MAINTENANCE.search(str(record.msg)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def adopt_library_loggers() -> None:
    """Send every library logger through the root handler (call again after importing a library
    that installs its own handler on import, e.g. transformers or diffusers)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def configure_logging(service: str, *, json_lines: bool = True, level: str = "INFO",
                      secrets: Iterable[str] = (),
                      current_job_id: Callable[[], str | None] = lambda: None) -> None:
    """Replace the root handlers with one redacting stream handler; RQ's, discord.py's, the hub's
    and every other library's loggers propagate to it (:func:`adopt_library_loggers`)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LineFormatter(service, json_lines, secrets))
    handler.addFilter(JobIdFilter(current_job_id))
    handler.addFilter(MaintenanceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    adopt_library_loggers()


def secrets_of(settings: Settings) -> list[str]:
    """Values that must never appear in a log line or a stored failure: the tokens, the Redis
    passwords, and a password written into the Redis URL itself."""
    values = (settings.discord_token, getattr(settings, "redis_password", None),
              getattr(settings, "redis_sentinel_password", None), getattr(settings, "hf_token", None))
    secrets = [value.get_secret_value() for value in values if value is not None]
    try:
        in_url = urlsplit(getattr(settings, "redis_url", "") or "").password
    except ValueError:  # a malformed URL: the connection refuses it, with its own message
        in_url = None
    return secrets + (sorted({in_url, unquote(in_url)}) if in_url else [])  # as written and decoded
