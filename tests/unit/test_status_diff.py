"""The live file against the previous one: a real unified diff, bounded, passwords hidden."""

from __future__ import annotations

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
