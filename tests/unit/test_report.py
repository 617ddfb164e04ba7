"""What an apply changed, for the timeline: from the runtime plan, or read from the two files for a reload."""

from __future__ import annotations

from renderer.deliver.change import ConfigChange
from renderer.deliver.report import describe_apply
from renderer.deliver.runtime import ServerChange, plan_runtime
from renderer.errors import ApplyKind
from renderer.status import ReloadWhy
from renderer.status.timeline import AppliedChange

OLD = """\
global
    maxconn 100
defaults
    mode http
backend api
    balance roundrobin
    server a 10.0.0.1:80 check
backend web
    balance roundrobin
    server w1 10.0.0.5:80 check
    server w2 10.0.0.6:80 check weight 2
"""


def described(old: str | None, new: str, kind: ApplyKind, plan: list[ServerChange] | None) -> AppliedChange:
    return describe_apply(old, ConfigChange(new, old, None, plan), kind)


def test_a_hitless_change_is_described_from_the_plan_the_installer_made() -> None:
    new = OLD.replace("    server w2 10.0.0.6:80 check weight 2\n", "    server w2 10.0.0.6:80 check weight 5\n")
    new = new.replace(
        "    server a 10.0.0.1:80 check\n", "    server a 10.0.0.1:80 check\n    server b 10.0.0.2:80 check\n"
    )
    plan = plan_runtime(OLD, new)
    assert plan is not None
    change = described(OLD, new, ApplyKind.RUNTIME, plan)
    assert change.added.shown == ("api/b 10.0.0.2:80",) and change.changed.shown == ("web/w2 weight 2 → 5",)
    assert change.reload_why is None and change.summary() == "added api/b 10.0.0.2:80; changed web/w2 weight 2 → 5"


def test_a_reload_names_the_first_line_that_was_not_a_server_line() -> None:
    new = OLD.replace("backend web\n    balance roundrobin\n", "backend web\n    balance leastconn\n")
    new = new.replace("    server w1 10.0.0.5:80 check\n", "")
    change = described(OLD, new, ApplyKind.RELOAD, None)
    assert change.reload_why is ReloadWhy.STRUCTURAL and change.reload_line == "backend web: + balance leastconn"
    assert change.removed.shown == ("web/w1 10.0.0.5:80",)
    assert change.summary().endswith(
        "reload because a line other than a server line changed: backend web: + balance leastconn"
    )


def test_a_new_backend_and_a_global_change_are_named_too() -> None:
    added = OLD + "backend shop\n    server s 10.0.0.9:80\n"
    assert described(OLD, added, ApplyKind.RELOAD, None).reload_line == "backend shop: section added"
    tuned = OLD.replace("maxconn 100", "maxconn 200")
    assert described(OLD, tuned, ApplyKind.RELOAD, None).reload_line == "global: + maxconn 200"


def test_reloads_without_a_structural_line_say_why() -> None:
    moved = OLD.replace("10.0.0.5:80", "10.0.0.7:80")
    refused = described(OLD, moved, ApplyKind.RELOAD, plan_runtime(OLD, moved))
    assert refused.reload_why is ReloadWhy.RUNTIME_REFUSED and refused.changed.total == 1
    plain = described(OLD, moved, ApplyKind.RELOAD, None)
    assert plain.reload_why is ReloadWhy.SERVERS_ONLY and plain.reload_line is None
    assert described(None, OLD, ApplyKind.RELOAD, None).reload_why is ReloadWhy.FIRST


def test_many_servers_are_counted_whole_and_named_in_part() -> None:
    many = OLD + "backend big\n" + "".join(f"    server s{n} 10.1.{n // 200}.{n % 200}:80\n" for n in range(300))
    grown = many.replace(
        "backend big\n", "backend big\n" + "".join(f"    server t{n} 10.2.0.{n}:80\n" for n in range(50))
    )
    change = described(many, grown, ApplyKind.RUNTIME, plan_runtime(many, grown))
    assert change.added.total == 50 and len(change.added.shown) == 20
    assert change.summary().startswith("added 50: big/t0 10.2.0.0:80, big/t1 10.2.0.1:80, big/t10 10.2.0.10:80, …")


def test_what_cannot_be_read_never_fails_the_apply() -> None:
    odd = OLD.replace("server w1 10.0.0.5:80 check", "server w1 10.0.0.5:80 'unclosed")
    change = described(OLD, odd, ApplyKind.RELOAD, None)
    assert change.reload_why is ReloadWhy.STRUCTURAL
    assert described(OLD, OLD + "# c\n", ApplyKind.NONE, None).summary() == "no server changed"


def test_a_password_changed_is_told_with_the_password_hidden() -> None:
    """helper-133 (/tmp/rev79): an operator's new `stats auth` or userlist password reached the
    timeline (/status, the page, `consul-renderer status --changes`) and the log line's summary."""
    old = "userlist ops\n    user admin insecure-password oldpass\nlisten stats\n    stats auth admin:oldpass\n"
    new = old.replace("oldpass", "N3wpass")
    applied = described(old, new, ApplyKind.RELOAD, None)
    assert applied.reload_line == "userlist ops: + user admin insecure-password (hidden)", applied.reload_line
    summary = ConfigChange(new, old, None, None).summary
    assert summary.startswith("+2 -2 lines: + user admin insecure-password (hidden); + stats auth (hidden)"), summary
    assert not {"oldpass", "N3wpass"} & {*summary.split(), *applied.summary().split()}
