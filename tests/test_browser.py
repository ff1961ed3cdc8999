"""The AWX UI's way of subscribing, in a real browser, through nginx, with Tower session cookies.

Headless Debian Chromium (driven by Playwright, never a downloaded browser)
loads ``tests/browser/burst.html`` from the same origin as the websocket: nginx
configured with ``etc/nginx/towerws.conf`` as shipped, plus one location for the
page.  towerws asks the fake Tower API (``faketower``) who the session cookie
belongs to and whether it may see each job.  The page sends its groups the
instant the socket opens and then several full groups messages in one go, as
ansible-ui does while a page mounts; it must end up subscribed to the last set
and receive exactly what is published to it.  Skips, saying why, only where
Chromium or nginx cannot be had (``make test`` installs both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from conftest import ROOT, aio_test, free_port
from faketower import ALICE, fake_tower, object_path  # noqa: F401 (fixture)
from nginxhelpers import nginx_binary, running_nginx, shipped_site
from test_console import CHROMIUM, CHROMIUM_ARGS

PAGES = ROOT / "tests" / "browser"
WAIT_MS = 15_000
ME = "/api/v2/me/"


def groups_of(groups: dict[str, list[Any]]) -> list[str]:
    return sorted(f"{key}-{item}" for key, items in groups.items() for item in items)


#: what the page sends, in this order: every set differs, and only the last asks for status_changed
SETS: list[dict[str, list[Any]]] = [
    {"jobs": ["summary"], "job_events": [300 + i]} if i % 2 else {"job_events": [300 + i], "schedules": ["changed"]}
    for i in range(7)
] + [{"jobs": ["status_changed"], "job_events": [307], "inventories": ["status_changed"]}]


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"needs Debian's chromium at {CHROMIUM} (make test installs it: apt-get install chromium)")
@aio_test
async def test_ui_burst_in_chromium_through_nginx_ends_in_the_last_set(
    server_factory: Any, fake_tower: Any, publisher: Any, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    nginx_binary()  # skips first if there is no nginx
    for job in range(300, 308):
        fake_tower.objects[object_path("job_events", job)] = {ALICE.id}
    node = await server_factory(tower_url=fake_tower.url)
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    page_location = f"    location /ui/ {{\n        alias {PAGES}/;\n        default_type text/html;\n    }}\n\n"
    async with running_nginx(tmp_path, shipped_site([node.port], port, page_location), port), \
            async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            context = await browser.new_context()
            # As a logged-in AWX UI has them: the session cookie (HttpOnly) and the
            # csrftoken the page reads and sends back as the xrftoken.
            await context.add_cookies([
                {"name": "sessionid", "value": ALICE.session, "url": origin, "httpOnly": True},
                {"name": "csrftoken", "value": ALICE.csrftoken, "url": origin},
            ])
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{origin}/ui/burst.html?sets={quote(json.dumps(SETS))}")

            # One final answer per message; the last is the reply to the last message.
            await page.wait_for_function("window.done !== undefined", timeout=WAIT_MS)
            received = await page.evaluate("window.received")
            assert received[0] == {"accept": True, "user": ALICE.id}, received
            answers = await page.evaluate("window.answers")
            assert len(answers) == len(SETS)
            assert answers[-1]["groups_current"] == groups_of(SETS[-1]), answers
            assert all("groups_current" in a or a == {"error": "superseded"} for a in answers), answers
            assert [m for m in received[1:] if m not in answers] == []  # no error of any other kind
            (conn,) = node.service.factory.connections
            assert node.service.hub.groups_of(conn) == frozenset(groups_of(SETS[-1]))
            # The browser's session cookie reached the Tower API, and the object checks were made with it.
            assert any(s.path == ME and f"sessionid={ALICE.session}" in s.headers.get("cookie", "")
                       for s in fake_tower.requests)
            assert all(f"sessionid={ALICE.session}" in s.headers.get("cookie", "") for s in fake_tower.requests)

            # Every group any message asked for gets a message, the earlier sets' first: one
            # ordered queue, so if anything of theirs were delivered it would come before the rest.
            earlier = sorted({g for groups in SETS[:-1] for g in groups_of(groups)} - set(groups_of(SETS[-1])))
            wanted = groups_of(SETS[-1])
            await publisher.publish_many([(g, json.dumps({"g": g}).encode(), None) for g in earlier + wanted])
            await page.wait_for_function(f"window.received.filter((m) => 'g' in m).length >= {len(wanted)}",
                                         timeout=WAIT_MS)
            await publisher.publish(wanted[0], {"g": "last"})  # and nothing else was on its way
            await page.wait_for_function("window.received.some((m) => m.g === 'last')", timeout=WAIT_MS)
            deliveries = [m["g"] for m in await page.evaluate("window.received") if "g" in m]
            assert deliveries == wanted + ["last"]
            assert errors == []
        finally:
            await browser.close()
