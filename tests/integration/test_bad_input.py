"""Bad input: one line naming the problem and the fix, an exit code per error class, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, start_consul_dev, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command

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
        "run", "--once", "--consul-addr", str(agent.extra["http_addr"]),
        "--template", f"{DEFAULT_TEMPLATE}:{dest}", "--log-level", "error",
        env={**os.environ, "CONSUL_HTTP_TOKEN": secret},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc)
    assert "ACL" in line and "give the token read" in line
    assert secret not in proc.stderr + proc.stdout
    assert not dest.exists()


def closed_port() -> int:
    from lab.processes import free_port

    return free_port()  # nothing listens there once the probe socket is closed


def test_once_gives_up_past_its_deadline_naming_the_address_and_the_error(tmp_path: Path) -> None:
    port = closed_port()
    dest = tmp_path / "haproxy.cfg"
    proc = run(
        "run", "--once", "--once-timeout", "12s", "--consul-addr", f"127.0.0.1:{port}",
        "--template", f"{DEFAULT_TEMPLATE}:{dest}", "--log-level", "warning", "--log-format", "text",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    last = lines[-1]
    assert "--once: no complete render within 12s (once_timeout)" in last
    assert f"Consul at http://127.0.0.1:{port} refused the connection: nothing listens there" in last
    assert "check --consul-addr (CONSUL_HTTP_ADDR)" in last
    assert "ConnectionKey" not in proc.stderr and "ssl=" not in proc.stderr
    # One line when it started failing, one progress line (every 10 s), never a line per key.
    progress = [line for line in lines if "failing for" in line]
    assert len(progress) == 1, proc.stderr
    assert "failed queries" in progress[0] and "watched keys waiting" in progress[0]
    assert len(lines) <= 4, proc.stderr
    assert not dest.exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_first_render_is_not_success(tmp_path: Path, signum: int, code: int) -> None:
    dest = tmp_path / "haproxy.cfg"
    cmd = renderer_command(
        "run", "--once", "--consul-addr", f"127.0.0.1:{closed_port()}", "--template", f"{DEFAULT_TEMPLATE}:{dest}",
    )  # fmt: skip
    log = tmp_path / "renderer.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        # Logged once the signal handlers are in place and the first query is out.
        wait_until(lambda: "watching Consul" in log.read_text(), 20, "the renderer to start watching")
        proc.send_signal(signum)
        proc.wait(timeout=20)
        err = log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "before the first complete render: nothing was rendered" in err
    assert not dest.exists()


def test_check_needs_no_destination_and_shows_only_its_flags() -> None:
    proc = run("check", "--template", str(DEFAULT_TEMPLATE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok: 1 template(s) parse; configuration valid"
    bare = run("check")  # no template at all: the default one
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.splitlines() == [
        f"no template given: checking the default template {DEFAULT_TEMPLATE}",
        "ok: 1 template(s) parse; configuration valid",
    ]
    helptext = " ".join(run("check", "--help").stdout.split())
    assert "without contacting Consul and without writing anything" in helptext
    assert "SRC[:DST[:COMMAND]]" in helptext and "e.g. --template templates/haproxy.cfg.j2" in helptext
    for run_only in ("--once", "--dry", "--exec-haproxy", "--status-addr", "--register-self"):
        assert run_only not in helptext
