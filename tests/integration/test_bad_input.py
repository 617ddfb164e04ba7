"""Bad input: one line naming the problem and the fix, an exit code per error class, nothing written."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from renderer.demo.processes import ManagedProcess, start_consul_dev
from renderer.demo.stack import DEFAULT_TEMPLATE, renderer_command

pytestmark = pytest.mark.integration


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(renderer_command(*args), capture_output=True, text=True, timeout=60, env=env)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setup", "code", "expected"),
    [
        ("malformed_config", 2, "is not valid TOML"),
        ("unknown_key", 2, "unknown key 'consul_adr'; did you mean 'consul_addr'?"),
        ("missing_template", 4, "does not exist; fix the template's source path"),
        ("malformed_template_flag", 2, "expected SRC:DST[:COMMAND]"),
        ("bad_consul_address", 2, "is not an address; write HOST:PORT"),
        ("bad_var", 2, "expected KEY=VALUE"),
    ],
)
def test_bad_input_one_line_exit_code_nothing_written(tmp_path: Path, setup: str, code: int, expected: str) -> None:
    dest = tmp_path / "out" / "haproxy.cfg"
    dest.parent.mkdir()
    spec = f"{DEFAULT_TEMPLATE}:{dest}"
    config = tmp_path / "c.toml"
    args = {
        "malformed_config": ("--config", str(config)),
        "unknown_key": ("--config", str(config)),
        "missing_template": ("--template", f"{tmp_path}/nope.j2:{dest}"),
        "malformed_template_flag": ("--template", "only-a-source.j2"),
        "bad_consul_address": ("--consul-addr", "not an address", "--template", spec),
        "bad_var": ("--template", spec, "--var", "novalue"),
    }[setup]
    config.write_text({"malformed_config": "wait = \n", "unknown_key": 'consul_adr = "x:1"\n'}.get(setup, ""))
    proc = run("run", "--once", *args)
    assert proc.returncode == code, proc.stderr
    assert expected in one_line(proc)
    assert list(dest.parent.iterdir()) == []


def test_token_refused_by_an_acl_agent(
    tmp_path: Path, consul_bin: str, track: Callable[[ManagedProcess], ManagedProcess]
) -> None:
    acl = 'acl { enabled = true, default_policy = "deny", tokens { master = "root-secret" } }'
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", hcl=(acl,)))
    dest = tmp_path / "haproxy.cfg"
    secret = "d1f0e0c2-0000-4000-8000-00000000beef"
    proc = run(
        "run", "--once", "--consul-addr", str(agent.extra["http_addr"]), "--token", secret,
        "--template", f"{DEFAULT_TEMPLATE}:{dest}", "--log-level", "error",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc)
    assert "ACL" in line and "give the token read" in line
    assert secret not in proc.stderr + proc.stdout
    assert not dest.exists()
