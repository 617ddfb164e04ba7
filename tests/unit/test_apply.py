"""Applying an installed file: a template's command, or nothing; never a runtime plan for a command."""

from __future__ import annotations

from pathlib import Path

import pytest

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import Applier
from renderer.errors import ApplyKind, ReloadError


def spec(tmp_path: Path, command: str | None) -> TemplateSpec:
    return TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg", command=command)


def test_a_template_command_runs_and_its_failure_is_a_reload_error_with_its_output(tmp_path: Path) -> None:
    applier = Applier(Config())
    assert applier.apply(spec(tmp_path, "true")).kind is ApplyKind.COMMAND
    with pytest.raises(ReloadError, match=r"command `echo nope; false` for .*out.cfg failed \(1\): nope"):
        applier.apply(spec(tmp_path, "echo nope; false"))


def test_no_command_and_no_haproxy_means_nothing_to_apply(tmp_path: Path) -> None:
    assert Applier(Config()).apply(spec(tmp_path, None)).kind is ApplyKind.NONE


def test_a_command_template_never_takes_the_runtime_path(tmp_path: Path) -> None:
    config = Config(haproxy_master_socket="/nonexistent/master.sock")
    assert not Applier(config).hitless(spec(tmp_path, "true"))
