"""Log lines: JSON when asked, secrets never in clear."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest

from renderer.logs import JsonFormatter, LineBudget, redact
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.status import Status


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


def test_a_churn_of_instances_left_out_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """helper-133 (/tmp/rev79): a registrant registering 200 bad instances a second made ~4 log lines
    each (an error when left out, an info when gone, per template): 165 kB of log a second. Past a
    burst, a template logs a line a second on them, and says how many it did not log."""
    status = Status(templates=1)
    state = TemplateState(renderer=SimpleNamespace(spec=SimpleNamespace(destination="/x.cfg")))  # type: ignore[arg-type]
    cycle = SimpleNamespace(_status=status)
    clock = [1000.0]
    caplog.set_level(logging.INFO, logger="renderer.runner")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "monotonic", lambda: clock[0])
        for second in range(60):  # 60 s, 10 renders a second, 20 new bad instances each, the last 20 gone
            for tenth in range(10):
                clock[0] = 1000.0 + second + tenth / 10
                batch = tuple(
                    f"service junk, instance 'j{second}-{tenth}-{n}' on node 'n', field Address: bad" for n in range(20)
                )
                RenderCycle._note_left_out(cycle, state, batch)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert 50 <= len(lines) <= 50 + 60 + 1, len(lines)  # 24,000 lines before
    told = [line for line in lines if "not logged" in line]
    assert told and sum(int(line.split(": ")[1].split()[0]) for line in told) > 23_000, told[-1]
    assert status.snapshot()["left_out_total"]["/x.cfg"] == 20  # what is left out now, whole


def test_a_line_budget_given_a_clock_that_went_back_grants_nothing_and_takes_nothing() -> None:
    """helper-135 (/tmp/rev81): a `now` before the last gave a negative grant (`new[:-1000]` logs all
    but the last 1,000 lines) and counted too many as skipped."""
    budget = LineBudget()
    assert budget.take(60, 100.0) == 50 and budget.skipped == 10
    assert budget.take(100, -900.0) == 0 and budget.skipped == 110
    assert budget.take(5, 105.0) == 5  # five seconds after the latest time seen
