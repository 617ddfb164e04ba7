"""Running a program: how it ended, or an error that says what took too long or could not start."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from renderer import commands
from renderer.commands import BACKGROUND_NICE, Hurry, Superseded, probe, run_command
from renderer.deliver.write import process_alive
from renderer.errors import ValidationError
from tests.helpers import Pace, normal_nice, record_nice


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
    nice = "cut -d' ' -f19 /proc/$$/stat"  # field 19: the nice value
    lowered = f'i=0; while [ "$({nice})" = {NORMAL} ] && [ $i -lt 200 ]; do sleep 0.02; i=$((i+1)); done; {nice}'
    assert run_command(lowered, 5, ValidationError, "nice", background=Hurry()).output == str(BACKGROUND_NICE) == "19"
    assert run_command(nice, 5, ValidationError, "nice").output == NORMAL


NORMAL = normal_nice()


def recorded_runs(runs: Path, then: str, lowered: bool = True) -> str:
    """A shell line that appends its nice value to `runs`, then runs `then` on its first run only
    (`exec`: a killed first run leaves no process behind)."""
    return f"{record_nice(runs, lowered)}; [ $(wc -l < {runs}) -gt 1 ] || {then}; echo done"


def test_a_background_program_out_of_time_runs_again_at_normal_priority(tmp_path: Path) -> None:
    """A busy CPU may starve a low-priority check: that must not read as a failed check."""
    runs = tmp_path / "runs"
    started = time.monotonic()
    done = run_command(recorded_runs(runs, "exec sleep 5"), 1.0, ValidationError, "the check", background=Hurry())
    assert done.output == "done" and runs.read_text().split()[1] == NORMAL
    assert time.monotonic() - started < 4


def test_a_starved_background_program_runs_again_at_normal_priority_before_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pace: Pace
) -> None:
    """The low priority must not turn a 30 s timeout into 30 s of a file lagging what HAProxy runs:
    a run that got almost no CPU over the grace (a sleep gets none) is run again at once, and the
    handle's later runs skip the low priority (the CPU is that busy)."""
    monkeypatch.setattr(commands, "BACKGROUND_GRACE_S", 0.3)
    runs, hurry = tmp_path / "runs", Hurry()
    started = time.monotonic()
    done = run_command(recorded_runs(runs, "exec sleep 10"), 30, ValidationError, "the check", background=hurry)
    assert done.output == "done" and runs.read_text().split() == [str(BACKGROUND_NICE), NORMAL]
    assert time.monotonic() - started < pace(3) and hurry.urgent


def test_a_slow_background_program_that_gets_the_cpu_goes_on_at_low_priority(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A check that is merely slow (a large file, many certificates) is not starved: run again at
    the grace, it would do its work twice and lag the file by the grace each time (helper-126)."""
    runs = fed(monkeypatch, tmp_path)
    hurry = Hurry()
    assert run_command([sys.executable, "-c", SPIN.format(runs=str(runs))], 60, ValidationError, "check", hurry).ok
    assert runs.read_text() == "run\n" and not hurry.urgent  # one run, never taken for starved


def fed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A grace of 0.2 s, and the "low" priority the test's own, so that a busy machine (CI) cannot
    starve the run: these tests are about how its CPU is counted, not what the kernel gives it."""
    monkeypatch.setattr(commands, "BACKGROUND_GRACE_S", 0.2)
    monkeypatch.setattr(commands, "BACKGROUND_NICE", os.getpriority(os.PRIO_PROCESS, 0))
    monkeypatch.setattr(commands, "STARVED_SHARE", 0.05)  # 1/20 of a core: a loaded machine still gives that
    return tmp_path / "runs"


SPIN = "import time\nopen({runs!r}, 'a').write('run\\n')\nend = time.monotonic() + 1\nwhile time.monotonic() < end: 0"


def test_a_hurried_background_program_runs_again_at_normal_priority_at_once(tmp_path: Path, pace: Pace) -> None:
    """Whoever comes to wait for a low-priority check (a reload behind it, shutdown) must not wait
    for what a busy CPU leaves it: the check is run again at the normal priority."""
    runs, hurry = tmp_path / "runs", Hurry()
    with ThreadPoolExecutor(1) as pool:
        check = recorded_runs(runs, f"exec sleep {pace(10):.0f}")
        running = pool.submit(run_command, check, pace(30), ValidationError, "the check", hurry)
        wait_for(lambda: runs.exists() and runs.read_text().count("\n") == 1, pace(3))
        hurried = time.monotonic()
        hurry.hurry()
        assert running.result(timeout=pace(20)).output == "done"
    assert time.monotonic() - hurried < pace(2)
    assert runs.read_text().split() == [str(BACKGROUND_NICE), NORMAL]
    assert run_command(recorded_runs(runs, "true"), 30, ValidationError, "the check", hurry).output == "done"
    assert runs.read_text().split()[2:] == [NORMAL]  # once hurried, every later run: the normal priority


def test_a_hurried_background_program_no_longer_wanted_is_not_run_again(tmp_path: Path, pace: Pace) -> None:
    """A write-behind whose content was replaced while its check ran at the low priority checks
    the newest next: a reload that hurries it must not wait for a check of content nobody will
    install (helper-127's finding 4)."""
    runs, wanted = tmp_path / "runs", [True]
    hurry = Hurry(wanted=lambda: wanted[0])
    with ThreadPoolExecutor(1) as pool:
        check = recorded_runs(runs, f"exec sleep {pace(10):.0f}")
        running = pool.submit(run_command, check, pace(30), ValidationError, "the check", hurry)
        wait_for(lambda: runs.exists() and runs.read_text().count("\n") == 1, pace(3))
        wanted[0] = False
        hurry.hurry()
        with pytest.raises(Superseded, match="the check: stopped at low priority"):
            running.result(timeout=pace(20))
    assert runs.read_text().split() == [str(BACKGROUND_NICE)]
    assert run_command(recorded_runs(runs, "true"), 30, ValidationError, "the check", hurry).output == "done"
    assert runs.read_text().split()[1:] == [NORMAL]  # a later run through the handle: run, at the normal priority


def test_a_hurried_run_does_not_wait_for_what_it_left_running(tmp_path: Path, pace: Pace) -> None:
    """A killed shell's children (or a `timeout` in a check, which leaves the shell's process
    group) may hold its output open: the hurried run does not wait for them (helper-126), and they
    are killed with it, not left running (helper-127: /bin/sh need not exec a check's command)."""
    runs, child, hurry = tmp_path / "runs", tmp_path / "child", Hurry()
    check = recorded_runs(runs, f"{{ timeout 30 sleep 30 & echo $! > {child}; wait; }}")
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(run_command, check, pace(60), ValidationError, "the check", hurry)
            wait_for(lambda: child.exists() and child.read_text().strip() != "", pace(3))
            hurried = time.monotonic()
            hurry.hurry()
            assert running.result(timeout=pace(20)).output == "done"
        assert time.monotonic() - hurried < pace(2)
        left = int(child.read_text())
        wait_for(lambda: not process_alive(left), pace(2))  # killed with the shell (helper-127)
    finally:
        if child.exists() and child.read_text().strip():
            with contextlib.suppress(ProcessLookupError):  # `timeout` leads a process group: its sleep too
                os.killpg(int(child.read_text()), signal.SIGKILL)


def test_a_background_program_hurried_before_it_starts_runs_once_at_normal_priority(tmp_path: Path) -> None:
    runs, hurry = tmp_path / "runs", Hurry()
    hurry.hurry()
    done = run_command(recorded_runs(runs, "true", lowered=False), 30, ValidationError, "the check", hurry)
    assert done.output == "done" and runs.read_text().split() == [NORMAL]


def test_a_failure_hurried_is_still_a_failure_and_one_finished_before_is_kept(tmp_path: Path) -> None:
    hurry = Hurry()
    done = run_command("echo checked; exit 3", 30, ValidationError, "the check", hurry)
    hurry.hurry()  # after the end: nothing to hurry
    assert (done.returncode, done.output) == (3, "checked")
    failing = run_command("exit 4", 30, ValidationError, "the check", hurry)
    assert failing.returncode == 4


def test_a_background_check_that_calls_setsid_keeps_its_verdict() -> None:
    """A command that leads its own process group makes util-linux `setsid` fork and its parent
    exit 0 at once: a failing check read as passed (helper-126, against a run in a session of its
    own). The background run stays in the renderer's group."""
    failing = "exec setsid sh -c 'sleep 0.2; echo config is bad; exit 3'"
    done = run_command(failing, 30, ValidationError, "the check", Hurry())
    assert (done.returncode, done.output) == (3, "config is bad")


def test_a_background_program_ended_by_a_signal_runs_again_at_normal_priority(tmp_path: Path) -> None:
    """The kernel's OOM killer ending a low-priority check says nothing of the file: it must not
    undo the runtime changes as a failed check would (helper-126); nor when the check is a shell
    line's child, which the shell reports as an exit status above 128 (helper-127). A check that
    crashes every time costs one more run each, not two (the handle's later runs skip the low one)."""
    for signalled in ("kill -9 $$", "sh -c 'kill -9 $$'"):
        runs, hurry = tmp_path / f"runs{len(signalled)}", Hurry()
        line = f"{record_nice(runs)}; [ $(wc -l < {runs}) -gt 1 ] && echo done || {signalled}"
        done = run_command(line, 30, ValidationError, "the check", hurry)
        assert done.output == "done" and runs.read_text().split() == [str(BACKGROUND_NICE), NORMAL], signalled
        assert hurry.urgent


def test_a_background_program_fed_but_never_ending_is_timed_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pace: Pace
) -> None:
    """A run that gets the CPU goes on at the low priority, but not past its timeout (helper-127:
    each grace window restarted the count, and a check that spun forever was never stopped)."""
    fed(monkeypatch, tmp_path)
    hurry = Hurry()
    with ThreadPoolExecutor(1) as pool:
        spin = [sys.executable, "-c", "while True: 0"]
        running = pool.submit(run_command, spin, 1.5, ValidationError, "check", hurry)
        try:
            error = running.exception(timeout=pace(8))
        finally:
            hurry.hurry()  # a run never stopped ends here (its normal-priority run times out), not never
    assert isinstance(error, ValidationError) and "took longer than" in str(error), error


def test_a_shell_lines_check_is_counted_with_the_processes_under_the_shell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """/bin/sh (dash) runs a line's last command as its child: the shell alone uses no CPU, and a
    slow check under it read as starved and was run twice (helper-127)."""
    runs = fed(monkeypatch, tmp_path)
    hurry = Hurry()
    line = f"{sys.executable} -c {shlex.quote(SPIN.format(runs=str(runs)))}; true"
    assert run_command(line, 60, ValidationError, "the check", hurry).ok
    assert runs.read_text() == "run\n" and not hurry.urgent


def wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def test_the_timeout_holds_when_the_program_leaves_a_process_behind() -> None:
    started = time.monotonic()
    with pytest.raises(ValidationError, match="took longer than"):
        run_command("sleep 4 & echo started; sleep 4", 0.3, ValidationError, "the check")
    assert time.monotonic() - started < 2  # not until the left-behind sleep closes the pipes
