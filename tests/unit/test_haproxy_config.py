"""Reading HAProxy configuration text: sections, server lines by HAProxy's own keyword grammar."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renderer.deliver.runtime import plan_runtime
from renderer.haproxy import config_text
from renderer.haproxy.config_text import parse_server, split_raw, split_words
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


def shlex_words(line: str) -> list[str] | str:
    """What parse_server read a line as before its fast path: shlex's words, or its error."""
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as err:
        return f"ValueError: {err}"


def fast_words(line: str) -> list[str] | str:
    try:
        return split_words(line)
    except ValueError as err:
        return f"ValueError: {err}"


@pytest.mark.parametrize(
    "line",
    [
        "server web1_web-1 10.0.0.1:8080 check weight 10",
        "server a [2001:db8::1]:80 backup # a comment is a word to shlex without comments",
        "server a 10.0.0.1:80 check#x weight 1",
        "", " ", "  ", "server", " server a b", "server a b ", "server  a b", "server\ta b", "server a\tb",
        "server 'a b' 10.0.0.1:80", 'server "a b" 10.0.0.1:80', "server a\\ b 1:2", "server a\\", "server 'open",
        'server "open', "server a 1:2 sni str('x')", "server a\u00a0b 1:2", "server a \u00a0 1:2", "server a\u2028b",
        "server a\u3000b", "server a\x0bb", "server a\x0cb", "server a\x00b", "server a\rb", "server a\nb",
        "server a\x85b", "server é 1:2", "server a 1:2\n",
    ],
)  # fmt: skip
def test_split_words_reads_tricky_lines_as_shlex_does(line: str) -> None:
    assert fast_words(line) == shlex_words(line)


# Characters on which shlex and str.split(" ") disagree or which shlex treats specially, among plain ones.
TRICKY = " \t\r\n\x0b\x0c\x1c\x85\x00\u00a0\u1680\u2028\u2029\u3000'\"\\#;|&()[]:,=é"
lines = st.text(alphabet=st.sampled_from(TRICKY) | st.sampled_from("ab1.") | st.characters(), max_size=40)
server_lines = st.lists(
    st.text(alphabet=st.sampled_from("abz09-_.:[]#(),") | st.sampled_from(TRICKY), min_size=0, max_size=8),
    max_size=6,
).map(lambda words: " ".join(["server", *words]))

# Printable ASCII words one space apart: mostly plain, now and then with a quote or a backslash.
ascii_lines = st.lists(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8), max_size=6
).map(" ".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(lines, server_lines, ascii_lines))
def test_split_words_is_shlex_split_for_every_line(line: str) -> None:
    assert fast_words(line) == shlex_words(line)


def test_a_plain_server_line_is_split_without_shlex(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed promise: the lines the default template writes never reach shlex's slow reader."""

    def refuse(*_: object, **__: object) -> list[str]:
        raise AssertionError("shlex.split called for a plain line")

    monkeypatch.setattr(config_text.shlex, "split", refuse)
    server = parse_server("server filler-3_svc-0042 127.0.0.1:9 check weight 10 cookie filler-3_svc-0042")
    assert (server.name, server.address, server.port) == ("filler-3_svc-0042", "127.0.0.1", 9)
    assert server.options == (("check", None), ("weight", "10"), ("cookie", "filler-3_svc-0042"))
