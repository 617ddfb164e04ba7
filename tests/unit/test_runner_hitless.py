"""The hitless install's decisions, with our own Applier seam faked (never Consul or HAProxy)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from renderer.apply import ApplyOutcome
from renderer.config import Config, TemplateSpec
from renderer.errors import ValidationError
from renderer.runner import Runner
from renderer.runtime import RuntimeApplyError


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
        return ApplyOutcome("runtime", 0.0)

    def revert_runtime(self, applied: str, running: str) -> None:
        self.calls.append("revert")

    def apply(self, spec: Any) -> ApplyOutcome:
        self.calls.append("reload")
        return ApplyOutcome("reload", 0.0)


def runner(tmp_path: Path, check: str, applier: FakeApplier) -> tuple[Runner, Path]:
    (tmp_path / "t.j2").write_text("x\n")
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("old\n")
    spec = TemplateSpec(tmp_path / "t.j2", dest, check_command=check, haproxy=True)
    r = Runner(Config(templates=(spec,), haproxy_bin="/bin/true"))
    r._installer.applier = applier  # type: ignore[assignment]
    return r, dest


def test_failed_check_undoes_runtime_changes_and_keeps_the_file(tmp_path: Path) -> None:
    fake = FakeApplier()
    r, dest = runner(tmp_path, "false", fake)
    with pytest.raises(ValidationError):
        asyncio.run(r._install(r._templates[0], "new\n"))
    assert fake.calls == ["runtime", "revert"]
    assert dest.read_text() == "old\n"


def test_passing_check_installs_after_runtime(tmp_path: Path) -> None:
    fake = FakeApplier()
    r, dest = runner(tmp_path, "true", fake)
    asyncio.run(r._install(r._templates[0], "new\n"))
    assert fake.calls == ["runtime"]
    assert dest.read_text() == "new\n"


def test_refused_runtime_step_falls_back_to_reload_of_the_checked_file(tmp_path: Path) -> None:
    fake = FakeApplier(runtime_fails=True)
    r, dest = runner(tmp_path, "true", fake)
    asyncio.run(r._install(r._templates[0], "new\n"))
    assert fake.calls == ["runtime", "reload"]
    assert dest.read_text() == "new\n"
