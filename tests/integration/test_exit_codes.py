"""`--once` exit codes the README documents, each asserted exactly (5 validation, 6 reload), with
what is (not) left on disk; 130 and 143 (a signal before the first render) are in test_bad_input.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, free_port
from lab.stack import renderer_command

pytestmark = pytest.mark.integration

VALID = """global
    maxconn 100
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend http
    bind 127.0.0.1:{port}
"""


def run_once(tmp_path: Path, agent: ManagedProcess, haproxy_bin: str, text: str, *extra: str) -> tuple[int, str, Path]:
    (tmp_path / "t.j2").write_text(text)
    dest = tmp_path / "out" / "haproxy.cfg"
    dest.parent.mkdir()
    cmd = renderer_command(
        "run", "--once", "--consul-addr", str(agent.extra["http_addr"]), "--template", f"{tmp_path / 't.j2'}:{dest}",
        "--haproxy-bin", haproxy_bin, "--register-self", "false", "--status-addr", "off", *extra,
    )  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    return proc.returncode, proc.stderr, dest


def test_once_exits_5_when_the_file_fails_its_check_and_writes_nothing(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str
) -> None:
    code, err, dest = run_once(tmp_path, consul_agent, haproxy_bin, "global\n    no_such_keyword 1\n")
    assert code == 5, err
    assert "haproxy -c rejected" in err and "no_such_keyword" in err
    assert not dest.exists()


def test_once_exits_6_when_haproxy_cannot_be_reloaded(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str
) -> None:
    missing = tmp_path / "no-master.sock"
    text = VALID.format(port=free_port())
    code, err, dest = run_once(tmp_path, consul_agent, haproxy_bin, text, "--haproxy-master-socket", str(missing))
    assert code == 6, err
    assert f"HAProxy socket {missing} does not exist" in err
    assert dest.read_text() == text  # checked and installed; only its apply failed
