from __future__ import annotations

import logging

import pytest

from renderer.deliver.runtime import STATIC_BALANCE, add_server_line, membership_only, plan_runtime
from renderer.haproxy.checked import endpoint

BASE = """global
    maxconn 100
defaults
    mode http
    default-server inter 2s fall 2 rise 2
frontend http
    bind *:80
    default_backend web
backend web
    balance roundrobin
{servers}
listen stats
    bind *:1936
"""


def config(*servers: str) -> str:
    return BASE.format(servers="\n".join(f"    server {s}" for s in servers))


def test_membership_only_changes_are_planned_in_a_safe_order() -> None:
    old = config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check weight 5", "c 10.0.0.3:80 check")
    new = config("a 10.0.0.9:8080 check", "b 10.0.0.2:80 check weight 7", "d 10.0.0.4:80 check # new")
    plan = plan_runtime(old, new)
    assert plan is not None
    assert [(c.action, c.server.name) for c in plan] == [("add", "d"), ("set", "a"), ("set", "b"), ("remove", "c")]


def test_comments_and_blank_lines_are_not_changes() -> None:
    old = config("a 10.0.0.1:80 check")
    assert plan_runtime(old, old.replace("backend web\n", "backend web\n    # a comment\n\n")) == []


def test_structural_changes_need_a_reload() -> None:
    old = config("a 10.0.0.1:80 check")
    assert plan_runtime(old, old.replace("maxconn 100", "maxconn 200")) is None
    assert plan_runtime(old, old.replace("balance roundrobin", "balance leastconn")) is None
    assert plan_runtime(old, old + "backend api\n    server x 1.2.3.4:80\n") is None


def test_other_keyword_change_replaces_the_server() -> None:
    plan = plan_runtime(config("a 10.0.0.1:80 check"), config("a 10.0.0.1:80 check backup"))
    assert plan is not None and [c.action for c in plan] == ["remove", "add"]


def test_add_line_spells_out_default_server() -> None:
    plan = plan_runtime(config(), config("n 10.0.0.5:80 check weight 3"))
    assert plan is not None
    assert add_server_line(plan[0]) == "add server web/n 10.0.0.5:80 inter 2s fall 2 rise 2 check weight 3"


def test_a_configuration_reload_keeps_draining_servers_and_the_last_reload_time() -> None:
    from renderer.config import Config
    from renderer.deliver.apply import Applier
    from renderer.haproxy.config_text import parse_server

    config = Config(haproxy_master_socket="/nonexistent/master.sock")
    old = Applier(config)
    assert old.runtime is not None
    old.runtime.leftovers["web/a"] = parse_server("server a 10.0.0.1:80")
    old.pace.last, old.pace.level = 123.0, 7.5
    new = Applier(config, previous=old)
    assert new.has_cleanup and (new.pace.last, new.pace.level) == (123.0, 7.5)


def test_an_injected_address_or_a_broken_quote_means_a_reload_never_an_exception() -> None:
    old = config("a 10.0.0.1:80 check")
    injected = 'b "[fe80::1%x";@1 disable frontend http;"]:80" check'
    for new in (config("a 10.0.0.1:80 check", injected), config("a 10.0.0.1:80 check", 'b fe80::1%a":80 check')):
        assert plan_runtime(old, new) is None


def test_two_servers_of_one_name_mean_a_reload() -> None:
    old = config("a 10.0.0.1:80 check")
    assert plan_runtime(old, config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check", "b 10.0.0.3:80 check")) is None


def test_an_ipv6_server_is_added_with_brackets() -> None:
    old = config("a 10.0.0.1:80 check")
    plan = plan_runtime(old, config("a 10.0.0.1:80 check", "b [::1]:8080 check"))
    assert plan is not None and len(plan) == 1
    assert add_server_line(plan[0]).startswith("add server web/b [::1]:8080 ")


def test_a_keyword_argument_with_a_separator_means_a_reload() -> None:
    old = config("a 10.0.0.1:80 check")
    assert plan_runtime(old, config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check cookie x;y")) is None


class ScriptedAPI:
    """A Runtime API answering each command by its first words (unknown: empty, i.e. done)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.sent: list[str] = []

    def command(self, command: object) -> str:
        self.sent.append(str(command))
        return next((a for prefix, a in self.answers.items() if str(command).startswith(prefix)), "")

    def chain(self, commands: list[object]) -> list[str]:
        return [self.command(c) for c in commands]


def test_an_entry_still_draining_stays_a_leftover_when_its_return_is_refused() -> None:
    """A review's finding: a server removed while a request held it stays in maintenance until it
    can be deleted (a leftover). Coming back with other keywords, its return was refused and the
    leftover forgotten: the reload that followed saved its maintenance in the server-state file and
    the new worker kept it out of service, the file saying it served."""
    from typing import Any

    from renderer.deliver.runtime import ChangeAction, RuntimeApplier, RuntimeApplyError, ServerChange
    from renderer.haproxy.config_text import parse_server

    api: Any = ScriptedAPI({"del server": "Server still has connections attached to it, cannot remove it."})
    applier = RuntimeApplier(api)
    applier.leftovers["web/a"] = parse_server("server a 10.0.0.1:80 check")
    back = ServerChange(ChangeAction.ADD, "web", parse_server("server a 10.0.0.1:80 check backup"))
    with pytest.raises(RuntimeApplyError, match="came back with other keywords"):
        applier.run([back])
    assert list(applier.leftovers) == ["web/a"]
    api.answers["set server"] = "No such server."  # refused midway through the same keywords' return
    with pytest.raises(RuntimeApplyError):
        applier.run([ServerChange(ChangeAction.ADD, "web", parse_server("server a 10.0.0.9:80 check"))])
    assert list(applier.leftovers) == ["web/a"]


def test_the_saved_server_state_leaves_out_the_servers_put_in_maintenance_to_be_deleted() -> None:
    from renderer.deliver.apply import without_servers

    state = (
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n"
        "3 web 1 a 10.0.0.1 0 1\n3 web 2 b 10.0.0.2 2 0\n4 api 1 a 10.0.0.3 2 0\n"
    )
    kept = without_servers(state, {"web/a": None})
    assert kept == state.replace("3 web 1 a 10.0.0.1 0 1\n", "")  # api/a, of the same name, stays
    assert without_servers(state, {}) == state


def test_a_leftover_deleted_before_its_return_is_not_restored_when_a_later_step_is_refused() -> None:
    """A review's finding: its old entry deleted and the new one added, a refused `enable` put the
    leftover back, and cleanup would then have deleted the server the file lists."""
    from typing import Any

    from renderer.deliver.runtime import ChangeAction, RuntimeApplier, RuntimeApplyError, ServerChange
    from renderer.haproxy.config_text import parse_server

    api: Any = ScriptedAPI({"del server": "Server deleted.", "add server": "New server registered.", "enable": "No."})
    applier = RuntimeApplier(api)
    applier.leftovers["web/a"] = parse_server("server a 10.0.0.1:80 check")
    with pytest.raises(RuntimeApplyError, match="enable"):
        applier.run([ServerChange(ChangeAction.ADD, "web", parse_server("server a 10.0.0.2:80 check"))])
    assert applier.leftovers == {}


PARTS = """\
global
    maxconn 100
defaults
    mode http
backend evil
    balance roundrobin
    server e1 10.0.0.9:80 check
backend quiet
    server q1 10.0.0.5:80 check
backend shop
    server s1 10.0.0.1:80 check
"""


def test_the_membership_part_of_a_structural_change_is_the_server_lines_of_backends_otherwise_alone() -> None:
    """While a reload waits for its gap, the servers a change adds to backends it leaves otherwise
    alone go through the Runtime API: the rest (a setting, a new backend, a server of a backend whose
    settings change) waits for the reload."""
    content = (
        PARTS.replace("balance roundrobin", "balance leastconn")
        .replace("e1 10.0.0.9:80 check\n", "e1 10.0.0.9:80 check\n    server e2 10.0.0.8:80 check\n")
        .replace("s1 10.0.0.1:80 check\n", "s1 10.0.0.1:80 check\n    server s2 10.0.0.2:80 check\n")
        + "backend new\n    server n1 10.0.0.7:80 check\n"
    )
    assert plan_runtime(PARTS, content) is None  # structural: a reload
    part = membership_only(PARTS, content)
    assert part == PARTS + "    server s2 10.0.0.2:80 check\n"  # only shop's new server
    plan = plan_runtime(PARTS, part)
    assert plan is not None and [c.describe() for c in plan] == ["add shop/s2 10.0.0.2:80"]


@pytest.mark.parametrize(
    "content",
    [
        PARTS.replace("balance roundrobin", "balance leastconn"),  # nothing but a setting
        PARTS.replace("mode http", "mode tcp").replace("q1 10.0.0.5", "q1 10.0.0.6"),  # its defaults changed
        PARTS.replace("backend quiet\n    server q1 10.0.0.5:80 check\n", ""),  # a backend gone
        PARTS.replace("server s1 10.0.0.1:80 check", "server s1 10.0.0.1:80 check bogus-keyword 1"),
    ],
    ids=["setting-only", "defaults-changed", "backend-gone", "unreadable-server"],
)
def test_no_membership_part_when_no_backend_changes_only_its_servers(content: str) -> None:
    assert membership_only(PARTS, content) is None


@pytest.mark.parametrize(
    ("balance", "runtime"),
    [
        ("balance roundrobin", True),
        ("balance leastconn", True),
        ("balance first", True),
        ("balance random", True),
        ("balance source\n    hash-type consistent", True),
        ("balance hdr(host)\n    hash-type consistent", True),
        ("balance static-rr", False),
        ("balance source", False),
        ("balance uri", False),
        ("balance hdr(host)", False),
        ("balance source\n    hash-type map-based", False),
    ],
)
def test_servers_of_a_backend_with_a_static_balance_change_by_reload(
    balance: str, runtime: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """HAProxy 2.8 refuses `add server` where the balance is static ("Backend must use a dynamic load
    balancing to support dynamic servers", measured on 2.8.25 for each row): planned as a reload
    instead of a command HAProxy refuses (helper-130, /tmp/rev76); its comments alone still no change.
    The log says why, and how to fix it, where the operator reads it (the timeline says "see the
    log"; it was a debug line)."""
    old = config("a 10.0.0.1:80 check").replace("balance roundrobin", balance)
    new = config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check").replace("balance roundrobin", balance)
    caplog.set_level(logging.INFO, logger="renderer.deliver.runtime")
    plan = plan_runtime(old, new)
    assert (plan is not None) is runtime, plan
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert told == ([] if runtime else ["applying by reload: backend web: " + STATIC_BALANCE]), told
    assert "hash-type consistent" in STATIC_BALANCE
    assert plan_runtime(old, old.replace("backend web\n", "backend web\n    # a comment\n")) == []


def test_the_membership_part_leaves_out_a_backend_with_a_static_balance() -> None:
    static = PARTS.replace("backend quiet\n", "backend quiet\n    balance static-rr\n")
    content = (
        static.replace("balance roundrobin", "balance leastconn")
        .replace("q1 10.0.0.5:80 check\n", "q1 10.0.0.5:80 check\n    server q2 10.0.0.6:80 check\n")
        .replace("s1 10.0.0.1:80 check\n", "s1 10.0.0.1:80 check\n    server s2 10.0.0.2:80 check\n")
    )
    assert membership_only(static, content) == static + "    server s2 10.0.0.2:80 check\n"


def test_servers_named_by_a_host_name_are_added_or_moved_by_reload_and_removed_at_runtime() -> None:
    """HAProxy 2.8 resolves host names only when it loads its file: `add server` with one leaves the
    server with no address (down for good) and `set server addr` refuses one ("Invalid addr";
    helper-131, /tmp/rev77). Removing one needs no address."""
    one = config("a 10.0.0.1:80 check")
    named = config("a 10.0.0.1:80 check", "b app.example:80 check")
    assert plan_runtime(one, named) is None  # added
    assert plan_runtime(named, named.replace("app.example:80", "app.example:81")) is None  # moved
    removed = plan_runtime(named, one)
    assert removed is not None and [c.describe() for c in removed] == ["remove web/b app.example:80"]
    static = PARTS.replace("s1 10.0.0.1:80 check\n", "s1 10.0.0.1:80 check\n    server s2 10.0.0.2:80 check\n")
    content = static.replace("q1 10.0.0.5:80 check\n", "q1 10.0.0.5:80 check\n    server q2 db.example:80 check\n")
    assert membership_only(PARTS, content) == static  # quiet's host-named server waits for the reload


def test_two_spellings_of_one_address_render_alike() -> None:
    """helper-131 (/tmp/rev77): a registrant re-registering between two spellings of one address
    made each move a `set server addr` HAProxy answers "no need to change", taken for a refusal: a
    reload each. One spelling per address, so nothing changes."""
    spellings = [("2001:DB8::10", "2001:db8:0::10"), ("::ffff:127.0.0.1", "::FFFF:7f00:1"), ("10.0.0.1", "10.0.0.1")]
    for first, second in spellings:
        assert endpoint(first, 80) == endpoint(second, 80)
    assert endpoint("::ffff:7f00:1", 80) == "[::ffff:127.0.0.1]:80" and endpoint("db.example", 80) == "db.example:80"


def test_a_static_backend_still_takes_removals_and_moves_at_runtime_and_reads_its_defaults() -> None:
    """helper-132 (/tmp/rev78): HAProxy refuses only additions (and weights but 0%/100%) where the
    balance is static: removals and moves go through the Runtime API as before b81b7a0; and the
    algorithm (or `hash-type consistent`) set in `defaults` counts."""
    static = config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check").replace("balance roundrobin", "balance static-rr")
    removed = plan_runtime(static, static.replace("    server b 10.0.0.2:80 check\n", ""))
    assert removed is not None and [c.describe() for c in removed] == ["remove web/b 10.0.0.2:80"]
    moved = plan_runtime(static, static.replace("b 10.0.0.2:80", "b 10.0.0.3:81"))
    assert moved is not None and [c.action for c in moved] == ["set"]
    assert plan_runtime(static, static.replace("b 10.0.0.2:80 check", "b 10.0.0.2:80 check weight 5")) is None
    part = membership_only(static, static.replace("    server b 10.0.0.2:80 check\n", ""))
    assert part == static.replace("    server b 10.0.0.2:80 check\n", "")
    one, two = config("a 10.0.0.1:80 check"), config("a 10.0.0.1:80 check", "b 10.0.0.2:80 check")
    for defaults, balance, runtime in [
        ("    hash-type consistent\n", "balance source", True),
        ("    balance static-rr\n", None, False),
        ("    balance source\n", None, False),
    ]:
        old, new = (
            (text.replace("defaults\n", "defaults\n" + defaults).replace("balance roundrobin", balance or "# none"))
            for text in (one, two)
        )
        assert (plan_runtime(old, new) is not None) is runtime, (defaults, balance)


def test_a_host_named_server_changes_weight_and_state_at_runtime_and_its_case_is_no_move() -> None:
    """helper-132 (/tmp/rev78): only an addition or a move needs the name resolved; a weight or a
    maintenance change of a host-named server goes through the Runtime API; `APP.example` and
    `app.example` are one name."""
    named = config("a 10.0.0.1:80 check", "b app.example:80 check weight 5")
    weighed = plan_runtime(named, named.replace("weight 5", "weight 9"))
    assert weighed is not None and [c.action for c in weighed] == ["set"]
    drained = plan_runtime(named, named.replace("weight 5", "weight 5 disabled"))
    assert drained is not None and [c.action for c in drained] == ["set"]
    assert endpoint("APP.Example", 80) == endpoint("app.example", 80) == "app.example:80"
