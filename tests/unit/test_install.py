"""The hitless install's decisions, with our own Applier seam faked (never Consul or HAProxy)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from renderer.config import TemplateSpec
from renderer.deliver.apply import ApplyOutcome
from renderer.deliver.install import ApplyState, Installer
from renderer.deliver.runtime import RuntimeApplyError
from renderer.errors import ApplyKind, RendererError, ValidationError
from renderer.status import Status


class FakeApplier:
    def __init__(self, runtime_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.runtime_fails = runtime_fails
        self.has_cleanup = False

    def runtime_plan(self, spec: Any, running: str | None, content: str) -> list[Any]:
        return []

    def apply_runtime(self, plan: Any) -> ApplyOutcome:
        self.calls.append("runtime")
        if self.runtime_fails:
            raise RuntimeApplyError("refused")
        return ApplyOutcome(ApplyKind.RUNTIME, 0.0)

    def revert_runtime(self, applied: str, running: str) -> None:
        self.calls.append("revert")

    def apply(self, spec: Any) -> ApplyOutcome:
        self.calls.append("reload")
        return ApplyOutcome(ApplyKind.RELOAD, 0.0)


def setup(tmp_path: Path, check: str) -> tuple[TemplateSpec, Path]:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("old\n")
    return TemplateSpec(tmp_path / "t.j2", dest, check_command=check, haproxy=True), dest


def installer(fake: FakeApplier, errors: list[RendererError] | None) -> Installer:
    on_error = None if errors is None else (lambda spec, err, content: errors.append(err))
    return Installer(fake, Status(templates=1), "/bin/true", lambda: 0.0, on_file_error=on_error)  # type: ignore[arg-type]


def test_failed_check_undoes_runtime_changes_and_keeps_the_file(tmp_path: Path) -> None:
    fake, errors = FakeApplier(), list[RendererError]()
    spec, dest = setup(tmp_path, "false")

    async def scenario() -> None:
        inst = installer(fake, errors)
        await inst.install(spec, ApplyState(), "new\n")
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "revert"]
    assert [type(e) for e in errors] == [ValidationError]
    assert dest.read_text() == "old\n"


def test_without_an_error_handler_the_check_failure_is_raised(tmp_path: Path) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "false")
    with pytest.raises(ValidationError):
        asyncio.run(installer(fake, None).install(spec, ApplyState(), "new\n"))
    assert fake.calls == ["runtime", "revert"]
    assert dest.read_text() == "old\n"


def test_passing_check_installs_after_runtime(tmp_path: Path) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "true")

    async def scenario() -> None:
        inst = installer(fake, [])
        await inst.install(spec, ApplyState(), "new\n")
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime"]
    assert dest.read_text() == "new\n"


def test_refused_runtime_step_falls_back_to_reload_of_the_checked_file(tmp_path: Path) -> None:
    fake = FakeApplier(runtime_fails=True)
    spec, dest = setup(tmp_path, "true")
    asyncio.run(installer(fake, []).install(spec, ApplyState(), "new\n"))
    assert fake.calls == ["runtime", "reload"]
    assert dest.read_text() == "new\n"


def test_a_change_during_a_slow_check_is_applied_without_waiting_for_it(tmp_path: Path) -> None:
    fake = FakeApplier()
    spec, dest = setup(tmp_path, "sleep 0.5; test -f {path}")
    waited: list[float] = []

    async def scenario() -> None:
        inst = installer(fake, [])
        await inst.install(spec, ApplyState(), "one\n")
        started = time.monotonic()
        await inst.install(spec, ApplyState(), "two\n")  # the check of "one" is still running
        waited.append(time.monotonic() - started)
        await inst.flush()

    asyncio.run(scenario())
    assert fake.calls == ["runtime", "runtime"]
    assert waited[0] < 0.4, f"the second change waited {waited[0]:.2f}s for the first check"
    assert dest.read_text() == "two\n"  # the write-behind ends on the newest content
