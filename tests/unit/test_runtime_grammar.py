"""Runtime API commands: every word matches its position's grammar, or nothing is sent."""

from __future__ import annotations

import pytest

from renderer.haproxy import runtime_grammar as words
from renderer.haproxy.runtime_grammar import UnsafeCommand

SEPARATORS = [";", '"', "'", "\\", " ", "\n", "\r", "\t", "#", "@1 ", "\x00", "$", "`", "{", "}"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_no_word_carries_a_separator_or_a_quote(sep: str) -> None:
    with pytest.raises(UnsafeCommand):
        words.command("del", "server", f"web/a{sep}b")
    with pytest.raises(UnsafeCommand):
        words.target("web", f"a{sep}b")
    with pytest.raises(UnsafeCommand):
        words.argument(f"2s{sep}")


def test_positions_have_their_own_grammar() -> None:
    assert words.endpoint("::1", 80) == "[::1]:80"
    assert words.endpoint("10.0.0.1", 80) == "10.0.0.1:80"
    for bad_address in ['fe80::1%x";@1 disable frontend http;"', "fe80::1%eth0", "a b", ""]:
        with pytest.raises(UnsafeCommand):
            words.address(bad_address)
    for bad_port in [None, 0, 65536, -1]:
        with pytest.raises(UnsafeCommand):
            words.port(bad_port)
    with pytest.raises(UnsafeCommand):
        words.weight("257")
    with pytest.raises(UnsafeCommand):
        words.keyword("source")  # variable arity: never read as a guess
    with pytest.raises(UnsafeCommand):
        words.keyword("not-a-keyword")
    with pytest.raises(UnsafeCommand):
        words.command("shutdown", "frontend", "http")  # not a verb the renderer uses
    assert words.command("set", "server", "web/a", "weight", "7") == "set server web/a weight 7"


def test_no_command_line_comes_near_the_cli_buffer() -> None:
    """A payload line ending at HAProxy's buffer size less one is never answered, and HAProxy 2.8.25
    then aborts (helper-139, /tmp/rev85); plain lines were not seen to (helper-140), but no line is
    longer than MAX_LINE, far below any buffer: a longer one is refused before anything is sent."""
    longest = words.command("add", "server", "b/s", *(["a" * 511] * 7))
    assert len(longest) <= words.MAX_LINE
    with pytest.raises(UnsafeCommand, match="more than 4096"):
        words.command("add", "server", "b/s", *(["a" * 512] * 32))
