"""Log lines: JSON when asked, secrets never in clear."""

from __future__ import annotations

import json
import logging

from renderer.logs import JsonFormatter, redact


def test_a_json_line_carries_level_logger_message_and_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "renderer.runner", "levelname": "WARNING", "msg": "applied %s", "args": ("x",), "template": "t"}
    )
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["message"], entry["template"]) == (
        "warning",
        "renderer.runner",
        "applied x",
        "t",
    )
    assert entry["time"].endswith("Z")


def test_every_secret_is_redacted_and_none_is_ignored() -> None:
    assert redact("token=abc, again abc", "abc", None) == "token=[redacted], again [redacted]"
