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


def configure_logging(service: str, *, json_lines: bool = True, level: str = "INFO",
                      secrets: Iterable[str] = (),
                      current_job_id: Callable[[], str | None] = lambda: None) -> None:
    """Replace the root handlers with one redacting stream handler (RQ's loggers propagate to it)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LineFormatter(service, json_lines, secrets))
    handler.addFilter(JobIdFilter(current_job_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def secrets_of(settings: Settings) -> list[str]:
    """Values that must never appear in a log line."""
    token = settings.discord_token
    return [token.get_secret_value()] if token is not None else []
