"""Reading HAProxy configuration text: sections, server lines by HAProxy's own keyword grammar."""

from __future__ import annotations

import pytest

from renderer.deliver.runtime import plan_runtime
from renderer.haproxy.config_text import parse_server, split_raw
from renderer.haproxy.keywords import SERVER_KEYWORDS, UnknownServerKeyword, dump_server_keywords


def test_the_embedded_grammar_is_the_pinned_haproxys_own(haproxy_bin: str) -> None:
    """The table is HAProxy's list, not ours: regenerate it with scripts/server_keywords.py."""
    assert dict(SERVER_KEYWORDS) == dump_server_keywords(haproxy_bin)


@pytest.mark.parametrize(
    ("line", "options"),
    [
        # the default template's line, with its default-server keywords spelled out
        (
            "server web1_web-1 10.0.0.1:8080 check weight 10",
            (("check", None), ("weight", "10")),
        ),
        (
            "server s1 10.0.0.1:80 check inter 2s fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down",
            (("check", None), ("inter", "2s"), ("fall", "3"), ("rise", "2"), ("observe", "layer4"),
             ("error-limit", "3"), ("on-error", "mark-down")),
        ),
        # TLS to the backend, as in HAProxy's own examples
        (
            "server api 10.0.0.2:443 ssl verify none sni str(api.internal) alpn h2,http/1.1 check-ssl check",
            (("ssl", None), ("verify", "none"), ("sni", "str(api.internal)"), ("alpn", "h2,http/1.1"),
             ("check-ssl", None), ("check", None)),
        ),
        # `ws` takes an argument (auto|h1|h2): a table of flags once read it as one and mis-read the rest
        (
            "server chat 10.0.0.3:80 ws h2 maxconn 100 disabled",
            (("ws", "h2"), ("maxconn", "100"), ("disabled", None)),
        ),
        ("server a [2001:db8::1]:80 backup", (("backup", None),)),
    ],
)  # fmt: skip
def test_server_lines_from_real_configurations(line: str, options: tuple[tuple[str, str | None], ...]) -> None:
    assert parse_server(line).options == options


@pytest.mark.parametrize(
    "line",
    [
        "server a 10.0.0.1:80 check some-future-keyword 5",  # not in HAProxy 2.8's list
        "server a 10.0.0.1:80 source 10.0.0.9 usesrc clientip",  # a variable number of arguments
        "server a 10.0.0.1:80 check weight",  # an argument missing
    ],
)
def test_a_line_that_cannot_be_read_exactly_is_refused(line: str) -> None:
    with pytest.raises(UnknownServerKeyword):
        parse_server(line)


CONFIG = """global
    maxconn 100
backend web
    balance roundrobin
    server a 10.0.0.1:80 check {extra}
    server b 10.0.0.2:80 check
"""


def test_a_change_next_to_an_unknown_keyword_is_applied_by_reload() -> None:
    old = CONFIG.format(extra="some-future-keyword 5")
    new = old.replace("10.0.0.2:80", "10.0.0.3:80")
    assert plan_runtime(old, new) is None


def test_a_membership_change_with_known_keywords_is_planned_for_the_runtime_api() -> None:
    old = CONFIG.format(extra="ws h2")
    new = old.replace("    server b 10.0.0.2:80 check\n", "")
    plan = plan_runtime(old, new)
    assert plan is not None and [c.describe() for c in plan] == ["remove web/b 10.0.0.2:80"]


def test_split_raw_cuts_before_each_section_and_keeps_every_byte() -> None:
    text = "# head\nglobal\n    maxconn 1\n\nbackend web # the app\n    server a 1.2.3.4:80\n"
    backend = "backend web # the app\n    server a 1.2.3.4:80\n"
    assert split_raw(text) == ["# head\n", "global\n    maxconn 1\n\n", backend]
