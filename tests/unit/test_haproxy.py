from __future__ import annotations

from renderer.haproxy.control import parse_show_proc

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
