"""Log lines: one JSON object each, job id attached, secrets scrubbed even from library text."""

from __future__ import annotations

import json
import logging

import pytest
import requests

from core.logs import LineFormatter, redact

TOKEN = "tok-aW50ZXJhY3Rpb24.c2VjcmV0"


def format_record(formatter: logging.Formatter, msg: str, *args, exc_info=None, job_id=None) -> str:
    record = logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, msg, args, exc_info)
    if job_id:
        record.job_id = job_id
    return formatter.format(record)


def test_json_line_has_job_id_and_no_token():
    line = format_record(LineFormatter("worker", True), "posting to %s",
                         f"https://discord.com/api/v10/webhooks/1/{TOKEN}?wait=true", job_id="ix-5")
    data = json.loads(line)
    assert data["job_id"] == "ix-5" and data["service"] == "worker" and data["level"] == "ERROR"
    assert TOKEN not in line and "/webhooks/1/[redacted]" in data["msg"]


def test_traceback_of_a_connection_error_is_scrubbed():
    """requests puts the webhook URL (with the interaction token) in its exception message."""
    try:
        requests.post(f"http://127.0.0.1:9/api/v10/webhooks/1/{TOKEN}", timeout=1)
    except requests.ConnectionError:
        import sys

        exc_info = sys.exc_info()
    assert TOKEN in str(exc_info[1])
    for json_lines in (True, False):
        line = format_record(LineFormatter("worker", json_lines), "delivery failed", exc_info=exc_info)
        assert TOKEN not in line and "Traceback" in line


@pytest.mark.parametrize("text", [
    '{"t": "INTERACTION_CREATE", "d": {"id": "5", "token": "%s"}}' % TOKEN,
    "Delivery(application_id=1, interaction_token='%s')" % TOKEN,
    "Authorization: Bot %s" % TOKEN,
    "POST http://127.0.0.1/api/v10/interactions/5/%s/callback has returned 200" % TOKEN,
])
def test_token_fields_and_known_secrets_are_redacted(text):
    assert TOKEN not in redact(text, secrets=[TOKEN])
    assert TOKEN not in LineFormatter("bot", True, [TOKEN]).format(
        logging.LogRecord("discord", logging.DEBUG, __file__, 1, "%s", (text,), None))


def test_ordinary_text_is_left_alone():
    text = "max_tokens=5 tokenizer loaded; job ix-1 done in 12 ms"
    assert redact(text) == text
