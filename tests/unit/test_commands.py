"""Running a program: how it ended, or an error that says what took too long or could not start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from renderer.commands import BACKGROUND_NICE, probe, run_command
from renderer.errors import ValidationError


def test_a_finished_program_reports_its_code_and_output() -> None:
    done = run_command("echo out; echo err >&2; exit 3", 5, ValidationError, "the check")
    assert (done.ok, done.returncode, done.output) == (False, 3, "out\nerr")
    assert run_command(["true"], 5, ValidationError, "true").ok


def test_a_program_too_slow_or_missing_raises_the_callers_error_naming_it() -> None:
    with pytest.raises(ValidationError, match="the check took longer than 0s"):
        run_command(["sleep", "5"], 0.2, ValidationError, "the check")
    with pytest.raises(ValidationError, match="cannot run /nonexistent/haproxy"):
        run_command(["/nonexistent/haproxy", "-c"], 5, ValidationError, "/nonexistent/haproxy")


def test_a_probe_that_cannot_run_answers_empty() -> None:
    assert probe(["/nonexistent/consul", "version"]) == ""
    assert probe(["echo", "v1"]) == "v1\n"


def test_a_background_program_runs_at_a_lower_priority() -> None:
    nice = "sleep 0.3; cut -d' ' -f19 /proc/$$/stat"  # field 19: the nice value, read once it is set
    assert run_command(nice, 5, ValidationError, "nice", background=True).output == str(BACKGROUND_NICE)
    assert run_command(nice, 5, ValidationError, "nice").output == str(os.getpriority(os.PRIO_PROCESS, 0))


def test_a_background_program_out_of_time_runs_again_at_normal_priority(tmp_path: Path) -> None:
    """A busy CPU may starve a low-priority check: that must not read as a failed check."""
    runs = tmp_path / "runs"
    slow_first = f"cut -d' ' -f19 /proc/$$/stat >> {runs}; [ $(wc -l < {runs}) -gt 1 ] || sleep 5; echo done"
    started = time.monotonic()
    done = run_command(slow_first, 0.5, ValidationError, "the check", background=True)
    assert done.output == "done" and runs.read_text().split()[1] == str(os.getpriority(os.PRIO_PROCESS, 0))
    assert time.monotonic() - started < 4


def test_the_timeout_holds_when_the_program_leaves_a_process_behind() -> None:
    started = time.monotonic()
    with pytest.raises(ValidationError, match="took longer than"):
        run_command("sleep 4 & echo started; sleep 4", 0.3, ValidationError, "the check")
    assert time.monotonic() - started < 2  # not until the left-behind sleep closes the pipes
