"""Commands sharing a line, against a real HAProxy: a removal's three commands and an addition's
`enable`s go out in one round trip each, through the master CLI and through a stats socket, and
every answer is still read and judged: a refusal anywhere is a RuntimeApplyError (the caller then
reloads), never a silent success."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, free_port, start_haproxy
from renderer.deliver.runtime import ChangeAction, RuntimeApplier, RuntimeApplyError, ServerChange
from renderer.haproxy.config_text import Server
from renderer.haproxy.control import MasterCLI, RuntimeAPI

pytestmark = pytest.mark.integration

CONFIG = """global
    stats socket {stats} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend http
    bind 127.0.0.1:{port}
    default_backend web
backend web
    balance roundrobin
    server a 127.0.0.1:9
"""


def server(name: str, *options: tuple[str, str | None]) -> Server:
    return Server(name, "127.0.0.1", 9, tuple(options))


def state(api: RuntimeAPI) -> dict[str, list[str]]:
    """`show servers state web`: server name → its row."""
    text = api.master.worker_command("show servers state web") if api.master else ""
    rows = [line.split() for line in text.splitlines()[2:] if line.strip()]
    return {row[3]: row for row in rows}


@pytest.mark.parametrize("through", ["master", "stats socket"])
def test_one_line_per_removal_and_per_additions_enables(
    tmp_path: Path, haproxy_bin: str, track: Callable[[ManagedProcess], ManagedProcess], through: str
) -> None:
    stats, master_socket = tmp_path / "stats.sock", tmp_path / "master.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(stats=stats, port=free_port()))
    track(start_haproxy(haproxy_bin, config, master_socket, tmp_path / "haproxy.log"))
    master = MasterCLI(str(master_socket))
    api = RuntimeAPI(str(stats) if through == "stats socket" else None, master)
    applier = RuntimeApplier(api)

    applier.run([ServerChange(ChangeAction.ADD, "web", server("b", ("check", None)))])
    row = state(RuntimeAPI(master=master))["b"]
    assert (row[5], row[6]) == ("2", "0"), row  # srv_op_state 2 (running), srv_admin_state 0 (ready)
    assert applier.sent == 3  # add server, enable health, enable server

    applier.run([ServerChange(ChangeAction.REMOVE, "web", server("b"))])
    assert "b" not in state(RuntimeAPI(master=master)) and applier.leftovers == {}
    assert applier.sent == 6

    # A server HAProxy does not have: `disable server` is refused, and so is the removal.
    with pytest.raises(RuntimeApplyError, match="refused `disable server web/nosuch`: No such server"):
        applier.run([ServerChange(ChangeAction.REMOVE, "web", server("nosuch"))])
    # One that exists already: the add is refused alone, nothing enables what holds that name.
    master.worker_command("disable server web/a")
    with pytest.raises(RuntimeApplyError, match="refused `add server web/a"):
        applier.run([ServerChange(ChangeAction.ADD, "web", server("a"))])
    assert state(RuntimeAPI(master=master))["a"][6] == "1", "web/a stays in maintenance"
