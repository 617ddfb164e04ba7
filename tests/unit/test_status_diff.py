"""The live file against the previous one: a real unified diff, bounded, passwords hidden."""

from __future__ import annotations

import pytest

from renderer.status.diff import MAX_DIFF_LINES, file_diff, hide_secrets


def test_a_change_in_a_large_file_is_shown_with_its_real_line_numbers() -> None:
    old = "".join(f"    server s{n} 10.0.0.{n % 250}:80\n" for n in range(5000))
    new = old.replace("    server s4000 10.0.0.0:80\n", "    server s4000 10.0.0.1:80\n")
    diff = file_diff(old, new, "haproxy.cfg")
    assert diff.splitlines()[:3] == ["--- haproxy.cfg (previous)", "+++ haproxy.cfg (live)", "@@ -3998,7 +3998,7 @@"]
    assert "-    server s4000 10.0.0.0:80" in diff and "+    server s4000 10.0.0.1:80" in diff
    assert len(diff.splitlines()) == 3 + 7 + 1


def test_equal_files_have_no_diff_and_a_huge_one_is_cut() -> None:
    assert file_diff("a\n", "a\n", "x") == ""
    huge = file_diff("", "".join(f"line {n}\n" for n in range(10_000)), "x")
    assert len(huge.splitlines()) == MAX_DIFF_LINES + 1 and huge.endswith(f"… cut at {MAX_DIFF_LINES} lines\n")


def test_passwords_in_the_config_are_hidden() -> None:
    assert hide_secrets("    stats auth admin:s3cret") == "    stats auth (hidden)"
    assert hide_secrets("    user admin insecure-password s3cret") == "    user admin insecure-password (hidden)"
    assert "s3cret" not in file_diff("", "userlist u\n    user a password s3cret\n", "x")


@pytest.mark.parametrize(
    "line",
    [
        '    stats auth "admin:pa ss word"',
        "    user admin insecure-password pa\\ ss\\ word",
        '    http-request set-header Authorization "Basic c2VjcmV0"',
        '    http-check send meth GET uri /health hdr Authorization "Bearer c2VjcmV0"',
        "    option httpchk GET /health HTTP/1.1\\r\\nAuthorization:\\ Basic\\ c2VjcmV0",
        "    acl key_ok req.hdr(X-Api-Key) -m str c2VjcmV0",
        "    http-request set-header X-Auth-Token c2VjcmV0 if { path_beg /api }",
        "    STATS\tAUTH admin:c2VjcmV0",
    ],
)
def test_credentials_anywhere_in_a_line_are_hidden_to_its_end(line: str) -> None:
    """helper-135 (/tmp/rev81): a quoted password with spaces kept its tail, and Authorization
    headers (set, sent by a health check, escaped in `option httpchk`) and key headers were shown."""
    hidden = hide_secrets(line)
    assert hidden.endswith("(hidden)") and "ss word" not in hidden and "c2VjcmV0" not in hidden, hidden
    assert hide_secrets("    option httpchk GET /health") == "    option httpchk GET /health"


def test_a_new_password_is_a_change_shown_hidden() -> None:
    """helper-133 (/tmp/rev79): both sides were hidden before they were compared, so the diff said
    "no difference" for a change of `stats auth` that the timeline showed (with the password)."""
    old = "listen stats\n    bind :1936\n    stats auth admin:oldpass\n"
    diff = file_diff(old, old.replace("oldpass", "N3wpass"), "x")
    assert "-    stats auth (hidden)\n+    stats auth (hidden)\n" in diff
    assert "oldpass" not in diff and "N3wpass" not in diff


def test_a_change_too_large_to_match_is_shown_unmatched_without_difflib(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: 10,000 servers with every other one changed took difflib 5.7 s a request
    (24 s at 20,000), on a route open without a login on loopback."""
    import difflib

    monkeypatch.setattr(difflib, "unified_diff", lambda *a, **k: pytest.fail("difflib asked to match 20,000 lines"))
    old = "".join(f"    server s{n} 10.0.0.{n % 250}:80\n" for n in range(10_000))
    new = "".join(f"    server s{n} 10.0.{n % 2}.{n % 250}:80\n" for n in range(10_000))
    lines = file_diff(old, new, "haproxy.cfg").splitlines()
    assert lines[2].startswith("@@ -1,10000 +1,10000 @@ (20000 changed lines, not matched)")
    assert lines[3] == "-    server s0 10.0.0.0:80" and len(lines) == MAX_DIFF_LINES + 1


def test_diff_is_computed_once_while_the_files_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    import renderer.status.server as server_module
    from renderer.errors import ApplyKind
    from renderer.status import Status, StatusServer

    status = Status(templates=1)
    status.now_serving("/x.cfg", "backend web\n", ApplyKind.RELOAD, 0.1)
    status.now_serving("/x.cfg", "backend web\n    server a 10.0.0.1:80\n", ApplyKind.RUNTIME, 0.1)
    computed = []
    monkeypatch.setattr(server_module, "file_diff", lambda *args: computed.append(1) or file_diff(*args))

    async def run() -> list[str]:
        async with TestClient(TestServer(StatusServer(status, "127.0.0.1", 0).app())) as client:
            answers = await asyncio.gather(*(client.get("/diff", params={"template": "/x.cfg"}) for _ in range(8)))
            return [await answer.text() for answer in answers]

    texts = asyncio.run(run())
    assert len(computed) == 1 and all("+    server a 10.0.0.1:80" in text for text in texts)


@pytest.mark.parametrize(
    "line",
    [
        "    use_backend authorization if host_authorization",
        "    acl host_authorization hdr(host) -i authorization.example",
        "    server authorization 10.0.0.1:80 check",
        "    http-request set-header X-Api-Key-Version 2",
        "    http-request set-header X-Token-Source lb",
        "    acl tok hdr(x-token) -m found",
    ],
)
def test_names_that_only_contain_a_secret_word_are_not_hidden(line: str) -> None:
    """helper-137 (/tmp/rev83): "authorization" anywhere hid the rest of the line, so a service named
    so lost its routing lines from /diff and the timeline; a header name merely containing key or
    token lost its value, and `-m found` was taken for one."""
    assert hide_secrets(line) == line


def test_a_long_line_is_read_in_linear_time() -> None:
    """helper-137 (/tmp/rev83): `[\\w-]*(?:key|token|secret)[\\w-]*` backtracked quadratically (a
    32 KB `hdr(keykey…` line took 4.5 s; this one, 420 KB, outlasts the suite's 120 s timeout). Bounded
    repeats: the answer at once."""
    assert hide_secrets("hdr(" + "key" * 140_000) == "hdr(" + "key" * 140_000
