from __future__ import annotations

import socket
from pathlib import Path

import pytest

from renderer.errors import ReloadError
from renderer.haproxy import runtime_grammar as words
from renderer.haproxy.control import MasterCLI, RuntimeAPI, parse_show_proc, send_with_retry, split_answers
from renderer.haproxy.runtime_grammar import Command

SHOW_PROC = """#<PID>          <type>          <reloads>       <uptime>        <version>
2526            master          1 [failed: 0]   0d00h00m01s     2.8.25-5cf5d0683
# workers
2575            worker          0               0d00h00m00s     2.8.25-5cf5d0683
2529            worker          1               0d00h00m01s     2.8.25-5cf5d0683
# programs

"""


def test_parse_show_proc() -> None:
    info = parse_show_proc(SHOW_PROC)
    assert (info.master_pid, info.reloads, info.failed_reloads, info.workers) == (2526, 1, 0, (2575, 2529))


def test_the_answers_of_commands_on_one_line_are_told_apart_or_refused() -> None:
    assert split_answers("\n\nServer deleted.\n\n", 3) == ["", "", "Server deleted."]
    assert split_answers("No such server.\n\nNo such server.\n\n", 2) == ["No such server.", "No such server."]
    assert split_answers("\n", 1) == [""]
    assert split_answers("\n\n", 1) is None  # one answer too many
    assert split_answers("two\n\nparagraphs\n\n", 1) is None
    assert split_answers("no end", 1) is None


def test_commands_on_one_line_name_the_worker_each_through_the_master() -> None:
    sent: list[str] = []

    class Master(MasterCLI):
        def worker_command(self, command: str) -> str:
            sent.append(f"@1 {command}")
            return "\n\n"

    api = RuntimeAPI(master=Master("/nonexistent"))
    commands = [words.command("enable", "health", "web/a"), words.command("enable", "server", "web/a")]
    assert api.chain(commands) == ["", ""]
    assert sent == ["@1 enable health web/a; @1 enable server web/a"]
    with pytest.raises(ValueError, match="checked commands"):
        api.chain(["enable server web/a; disable frontend http"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="checked commands"):
        api.chain([Command("enable server web/a; disable frontend http")])  # made by hand, not by command()


def test_a_command_that_times_out_is_reported_without_its_payload(tmp_path: Path) -> None:
    """helper-139's run (/tmp/rev85): a `set ssl cert` HAProxy never answered was logged whole, its
    private key with it ("… failed: timed out"). Only the command's first line is shown."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)  # accepted by the kernel, never answered
        payload = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n"
        with pytest.raises(ReloadError) as err:
            send_with_retry(path, f"@1 set ssl cert /c/site.pem <<\n{payload}", timeout=0.2)
    assert "set ssl cert /c/site.pem <<" in str(err.value) and "payload not shown" in str(err.value)
    assert "PRIVATE KEY" not in str(err.value) and "MIGH" not in str(err.value)


def test_exec_mode_is_not_kept_from_starting_by_a_stale_socket_and_refuses_a_hung_master(tmp_path: Path) -> None:
    """helper-151's C: a master that accepts and never answers (SIGSTOP) let a second HAProxy start
    beside it after 2 s; a stale socket file (a master gone) must not keep the renderer from starting."""
    from renderer.haproxy.child import HAProxyChild

    path = tmp_path / "m.sock"
    child = HAProxyChild("haproxy", str(path), lambda: None)
    child.refuse_a_running_master()  # nothing there
    with socket.socket(socket.AF_UNIX) as hung:
        hung.bind(str(path))
        hung.listen()
        with pytest.raises(ReloadError, match="does not answer `show proc` within 2 s"):
            child.refuse_a_running_master()
    child.refuse_a_running_master()  # the socket file left behind, nobody listening
