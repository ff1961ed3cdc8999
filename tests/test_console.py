"""The live console: off by default, its files, and the page itself in headless Chromium.

The browser test drives Debian's Chromium with Playwright (``executable_path``; no
browser is ever downloaded). ``make test`` installs Chromium when it is missing; the
test skips, saying so, only if it is still absent. It leaves a screenshot in
``test-artifacts/console.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import pytest_twisted
import treq

from conftest import AMQP_URL, ROOT, VENV_BIN, Server, aio, aio_test, start_server, stop_server, wait

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"


def local_options(tokens_file: str, **extra: str) -> dict[str, str]:
    return {"listen": "tcp:0:interface=127.0.0.1", "amqp_url": "none", "tokens_file": tokens_file,
            "ping_interval": "0", **extra}


@pytest.fixture
def local_factory(tokens_file: str) -> Any:
    """Broker-less servers (the console's HTTP side needs no RabbitMQ)."""
    started: list[Server] = []

    async def make(**extra: str) -> Server:
        server = await start_server(local_options(tokens_file, **extra))
        started.append(server)
        return server

    yield make
    for server in started:
        pytest_twisted.blockon(aio(stop_server(server)))


async def fetch(url: str) -> tuple[int, Any, bytes]:
    response = await wait(treq.get(url, allow_redirects=False))
    return response.code, response.headers, await wait(treq.content(response))


@aio_test
async def test_console_is_off_by_default(local_factory: Any) -> None:
    server = await local_factory()
    for path in ("/console", "/console/", "/console/console.js"):
        assert (await fetch(server.http + path))[0] == 404


@aio_test
async def test_console_files(local_factory: Any) -> None:
    server = await local_factory(console="true")
    code, headers, _ = await fetch(server.http + "/console")
    assert code in (301, 302) and headers.getRawHeaders("location") == ["console/"]
    code, headers, body = await fetch(server.http + "/console/")
    assert code == 200 and b"<title>towerws console</title>" in body
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert "connect-src 'self'" in headers.getRawHeaders("content-security-policy")[0]
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
    for name, ctype in (("console.js", "text/javascript"), ("console.css", "text/css")):
        code, headers, body = await fetch(f"{server.http}/console/{name}")
        assert code == 200 and headers.getRawHeaders("content-type")[0].startswith(ctype) and body
    for path in ("/console/nope.js", "/console/../towerws.conf", "/console/static/console.js"):
        assert (await fetch(server.http + path))[0] == 404


# -- in a real browser --------------------------------------------------------------------------------


def publish_cli(exchange: str, group: str, payload: Any) -> asyncio.Future:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWERWS_")}
    return asyncio.create_subprocess_exec(
        str(VENV_BIN / "towerws-publish"), "--amqp-url", AMQP_URL, "--exchange", exchange, group, json.dumps(payload),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_publish(exchange: str, group: str, payload: Any) -> None:
    proc = await publish_cli(exchange, group, payload)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"needs Debian's chromium at {CHROMIUM} (make test installs it: apt-get install chromium)")
@aio_test
async def test_console_in_chromium_shows_published_message(server_factory: Any, exchange: str) -> None:
    from playwright.async_api import async_playwright, expect

    server = await server_factory(console="true")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            await page.goto(f"{server.http}/console")
            assert page.url.endswith("/console/")
            # The node's own /readyz: consuming, so ready.
            await expect(page.locator("#readiness")).to_have_text("ready")

            await page.fill("#token", "token-alice")
            await page.fill("#groups", '{"jobs": ["status_changed"]}')
            await page.click("#connect")
            await expect(page.locator("#connection")).to_have_text("live: jobs-status_changed")

            payload = {"unified_job_id": 42, "status": "running", "name": "Demo Job Template"}
            await run_publish(exchange, "jobs-status_changed", payload)
            first = page.locator("#messages li").first
            await expect(first.locator(".group")).to_have_text("jobs-status_changed")
            assert json.loads(await first.locator("pre").inner_text()) == payload
            assert "\n  " in await first.locator("pre").inner_text()  # pretty-printed

            # Paused: messages wait (counted) and appear on resume, newest first.
            await page.click("#pause")
            await run_publish(exchange, "jobs-status_changed", {"unified_job_id": 42, "status": "successful"})
            await expect(page.locator("#counters")).to_contain_text("paused, 1 waiting")
            assert await page.locator("#messages li").count() == 1
            await page.click("#pause")
            await expect(page.locator("#messages li")).to_have_count(2)
            assert json.loads(await page.locator("#messages li pre").first.inner_text())["status"] == "successful"
            await expect(page.locator("#counters")).to_have_text("received 2 · shown 2")

            await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            assert errors == []

            # /readyz answers stubbed, to show how the page renders each state.
            readyz = {"status": "ready", "amqp": "consuming", "clients": 3}
            other = await browser.new_page()
            await other.route("**/readyz", lambda route: route.fulfill(
                status=200, content_type="application/json", body=json.dumps(readyz)))
            await other.goto(f"{server.http}/console/")
            await expect(other.locator("#readiness")).to_have_text("ready")
            await expect(other.locator("#node-details")).to_contain_text("consuming")
            await other.unroute("**/readyz")
            await other.route("**/readyz", lambda route: route.fulfill(
                status=503, content_type="application/json", body=json.dumps({"status": "starting", "amqp": "connecting"})))
            await expect(other.locator("#readiness")).to_have_text("not ready (HTTP 503)")
            await expect(other.locator("#node-details")).to_contain_text("connecting")
        finally:
            await browser.close()
    assert (ARTIFACTS / "console.png").stat().st_size > 10_000


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"needs Debian's chromium at {CHROMIUM} (make test installs it: apt-get install chromium)")
@aio_test
async def test_console_in_chromium_shows_a_broker_less_node_ready(local_factory: Any) -> None:
    from playwright.async_api import async_playwright, expect

    server = await local_factory(console="true")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = await browser.new_page()
            page.set_default_timeout(15_000)
            await page.goto(f"{server.http}/console/")
            # The node's own /readyz, not a stub: broker-less and serving, so ready.
            await expect(page.locator("#readiness")).to_have_text("ready")
            await expect(page.locator("#node-details")).to_contain_text("disabled")
        finally:
            await browser.close()


def test_console_switch_from_command_line_environment_and_file(tmp_path: Any) -> None:
    from twisted.plugins.towerws_plugin import serviceMaker

    from towerws.config import ConfigError, load

    def parsed(*args: str) -> bool:
        opts = serviceMaker.options()
        opts.parseOptions(list(args))
        return opts.settings.console

    assert parsed() is False
    assert parsed("--console") is True
    assert load({}, environ={"TOWERWS_CONSOLE": "yes"}).console is True
    path = tmp_path / "towerws.conf"
    path.write_text("[towerws]\nconsole = true\n")
    assert load({}, environ={}, config_file=str(path)).console is True
    with pytest.raises(ConfigError, match="^--console .*must be true or false"):
        load({}, environ={"TOWERWS_CONSOLE": "maybe"})
