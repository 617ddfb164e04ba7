"""The operator's page, in a real browser against a real stack (Consul dev agent, HAProxy, renderer):
what is served, what is left out and why, each change with its cause and timing, live."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, free_port
from lab.webapp import WebApp
from renderer.errors import ApplyKind
from renderer.status import Status, StatusServer
from tests.browser import Session, screenshot, wait_for_text
from tests.helpers import Pace, consul_client, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def test_the_page_shows_what_is_served_each_change_with_its_timing_and_why_an_instance_is_left_out(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    browser: Session,
) -> None:
    for name in ("web-a", "web-b"):
        register(consul_agent, backends(name), check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--max-data-age", "2s"))
    base = f"http://127.0.0.1:{stack.status_port}/"
    page = browser.page()
    page.goto(base, wait_until="commit")
    wait_for_text(page, "dev_web-b", 15, "#templates")  # the servers table: backend web → its servers
    assert "passing" in page.inner_text("#check-state")

    # A registration shows up in the timeline by itself (no reload of the page), with its timing.
    web_c = backends("web-c")
    registered = time.monotonic()
    register(consul_agent, web_c, check=False)
    wait_for_text(page, f"web/dev_web-c 127.0.0.1:{web_c.port}", 5, "#changes")
    seen_after = time.monotonic() - registered
    row = page.locator("#changes tbody tr").first.inner_text()
    assert "runtime" in row and " ms" in row and "health.service(web" in row, row
    wait_for_text(page, "dev_web-c", 2, "#templates")

    # A left-out instance shows with its reason, as an operator reads it: which one, and why.
    catalog = consul_client(consul_agent).agent.service
    catalog.register("web", service_id="web-bad", address="not a host!", port=80, tags=["lb"])
    catalog.register("web", service_id="web-heavy", address="127.0.0.1", port=81, tags=["lb"], meta={"weight": "257"})
    wait_for_text(page, "instance 'web-heavy'", 10, "#templates")
    article = page.locator("article.template").filter(has=page.locator("h3", has_text="haproxy.cfg"))
    left_out = article.locator("table.left-out").inner_text()
    assert "instance 'web-bad'" in left_out and "is not an IPv4 or IPv6 address" in left_out, left_out
    assert "field Meta[weight]" in left_out, left_out
    assert page.inner_text("#check-state") == "warning"

    # The file's diff against the previous one, on demand.
    article.get_by_role("button", name="Show the diff against the previous file").click()
    wait_for_text(page, f"+    server dev_web-c 127.0.0.1:{web_c.port}", 5, "#templates")

    # Plain and accessible: every table has header cells, the chart is described; nothing external.
    assert page.locator("table:not(:has(th))").count() == 0
    assert "change(s), median" in (page.locator("#chart title").first.text_content() or "")
    outside = [url for url in browser.requested if not url.startswith(base)]
    assert not outside and not browser.errors, (outside, browser.errors)
    shot = screenshot(page, "operator-page.png")
    narrow = browser.page(width=380, height=800)
    narrow.goto(base, wait_until="commit")
    wait_for_text(narrow, "instance 'web-heavy'", 5, "#templates")
    page_width = narrow.evaluate("document.documentElement.scrollWidth")
    screenshot(narrow, "operator-page-narrow.png")
    assert page_width <= 380, f"the narrow page scrolls sideways: {page_width}px"

    # Consul gone: a banner says the data is stale, and since when; what is served stays listed.
    consul_agent.stop()
    wait_for_text(page, "Stale data: no answer from Consul at http://", 10, "#stale")
    assert page.get_by_role("alert").filter(has_text="Stale data").is_visible()
    assert "dev_web-c" in page.inner_text("#templates")
    screenshot(page, "operator-page-stale.png")
    print(f"registration → on the page in {seen_after:.2f}s; screenshot {shot}")


def test_the_page_lists_each_services_left_out_in_turn_and_finds_one_services_among_the_rest(
    browser: Session, pace: Pace
) -> None:
    """helper-133 (/tmp/rev79): the page listed the first 1,000 items left out, in sorted order, and
    said nothing of the rest: a registrant's 1,100 bad instances of a service named `aaa` hid a real
    service's. Each service's first ones are listed now; and when 1,000 services of one bad instance
    each fill the list, the operator finds a service's by its name. The real status server and page,
    in a real browser (no Consul or HAProxy needed)."""
    destination = "/etc/haproxy/haproxy.cfg"
    status = Status(templates=1)
    status.now_serving(destination, "backend web\n    server a 127.0.0.1:80\n", ApplyKind.RELOAD, 0.01)
    status.destination_ok(destination)
    flood = tuple(f"service aaa, instance 'x{n:04}' on node 'n', field Address: bad" for n in range(1100))
    names = tuple(f"service a{n:04}, instance 'y' on node 'n', field Address: bad" for n in range(1000))
    victim = "service zz-payments, instance 'p1' on node 'n', field Port: 'x' is not a port"
    status.set_left_out(destination, (*flood, "service web-important, instance 'w1' on node 'n', field Weight: bad"))
    port, loop = free_port(), asyncio.new_event_loop()
    server = StatusServer(status, "127.0.0.1", port)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(pace(10))
        page = browser.page()
        page.goto(f"http://127.0.0.1:{port}/", wait_until="commit")
        wait_for_text(page, "instance 'w1'", pace(15), "#templates")
        wait_for_text(page, "… and 101 more left out, not listed", pace(5), "#templates")
        assert page.locator("table.left-out tbody tr").count() == 1000
        status.set_left_out(destination, (*names, victim))  # one each: the victim's sorts last, unlisted
        wait_for_text(page, "… and 1 more left out, not listed", pace(5), "#templates")
        assert "zz-payments" not in page.locator("table.left-out").inner_text()
        page.get_by_label("Find what is left out of one service").fill("zz-payments")
        page.get_by_role("button", name="Find").click()
        wait_for_text(page, "Left out of service zz-payments: 1", pace(5), "#templates")
        row = page.locator("table.found tbody tr")
        assert row.count() == 1 and "'x' is not a port" in row.inner_text()
        page.get_by_label("Find what is left out of one service").fill("nobody")
        page.get_by_role("button", name="Find").click()
        wait_for_text(page, "Nothing of service nobody is left out.", pace(5), "#templates")
        status.set_left_out(destination, names[:10])  # the list whole again: no search offered
        wait_for_text(page, "service a0009", pace(5), "#templates")
        page.wait_for_function("() => document.querySelector('form.find').hidden", timeout=pace(5) * 1000)
        assert "nobody" not in page.locator("#templates").inner_text()  # the last search's answer went too
        assert not browser.errors, browser.errors
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(pace(10))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(pace(10))
        loop.close()
