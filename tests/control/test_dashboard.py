"""The controller's /metrics and dashboard: on loopback, behind a token but /metrics, live in a real browser.

The browser test drives Debian's ``chromium`` with playwright (never a browser
playwright downloads); it is skipped, saying why, when either is missing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import config
from mesh.control.dashboard import TOKEN_FILE
from mesh.control.state import StateDir, status

from ..harness import KEYED_APP, MeshMaker, app, eventually, fetch, free_port, unique_name, wait_until

# Ready only after START_AFTER seconds, so a test sees the mesh while it starts.
SLOW_APP = app('''
    time.sleep(float(os.environ.get("START_AFTER", "0")))

    class Handler(Base):
        def do_GET(self):
            self.reply(200, f"{os.environ['MESH_SERVICE']} {self.path}".encode())
''')

REFUSED = "the dashboard needs its token: `mesh dashboard` opens it\n"


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def get(session: aiohttp.ClientSession, url: str, **options: Any) -> tuple[int, dict[str, str], str]:
    async with session.get(url, allow_redirects=False, **options) as answer:
        return answer.status, dict(answer.headers), await answer.text()


async def test_dashboard_is_behind_its_token_and_metrics_are_public(make_mesh: MeshMaker) -> None:
    mesh = make_mesh(unique_name("dash"), '[services.web]\ncommand = "python app.py"\nenv = { START_AFTER = "2" }\n',
                     SLOW_APP)
    controller = mesh.make_controller()
    mesh.task = asyncio.ensure_future(controller.run())

    # While instances start, state.json (and so `mesh ps --json`) already names both, on loopback.
    def starting() -> dict[str, Any] | None:
        state = mesh.files.read_state()
        return state if state and state["phase"] == "starting" and "dashboard" in state["controller"] else None

    await eventually(starting, what=lambda: f"state.json while starting: {mesh.files.read_state()}")
    urls = starting() or {}
    dashboard, metrics_url = urls["controller"]["dashboard"], urls["controller"]["metrics"]
    port = int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]+)", dashboard).group(1))  # type: ignore[union-attr]
    token = dashboard.rpartition("=")[2]
    assert metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert len(token) >= 43  # 256 bits
    token_file = mesh.state_dir / TOKEN_FILE
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    await eventually(lambda: controller.phase != "starting", what=mesh.out.getvalue)
    assert controller.phase == "running", mesh.out.getvalue()

    # The app never has it: not in its environment.
    app_pid = mesh.instance("web")["pids"]["app"]
    assert token.encode() not in Path(f"/proc/{app_pid}/environ").read_bytes()

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        status_code, headers, text = await get(session, f"{base}/metrics")
        assert status_code == 200 and headers["Content-Type"].startswith("text/plain")
        assert metric(text, "mesh_controller_instances", service="web", state="running") == 1

        # Without the token, every path is the same 401 and says nothing of the mesh.
        for path in ("/", "/api/state", "/api/tap?service=web", "/no/such/path", "/?token=wrong",
                     "/api/state?token=" + token[:-1]):
            status_code, headers, text = await get(session, base + path)
            assert (status_code, text) == (401, REFUSED), path
        status_code, _, text = await get(session, f"{base}/api/state", headers={"Authorization": "Bearer nope"})
        assert (status_code, text) == (401, REFUSED)
        status_code, _, text = await get(session, f"{base}/api/state",
                                         headers={"Cookie": f"mesh_dashboard_{port}={token}"})
        assert (status_code, text) == (401, REFUSED)  # the cookie is not the token itself

        # Another Host (a rebound DNS name) is refused, token or not, /metrics too.
        for path in ("/api/state", "/metrics", f"/?token={token}"):
            status_code, _, _ = await get(session, base + path, headers={"Host": f"evil.example:{port}",
                                                                        "Authorization": f"Bearer {token}"})
            assert status_code == 403, path

        # The token in the URL: a cookie for the browser, and on to the page without it.
        status_code, headers, _ = await get(session, f"{base}/?token={token}")
        assert status_code == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"mesh_dashboard_{port}=") and token not in cookie
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert headers["Referrer-Policy"] == "no-referrer"
        jar = {"Cookie": cookie.split(";")[0]}
        status_code, headers, text = await get(session, f"{base}/", headers=jar)
        assert status_code == 200 and headers["Content-Type"].startswith("text/html")
        nonce = re.search(r'<script nonce="([\w-]+)">', text).group(1)  # type: ignore[union-attr]
        assert f"script-src 'nonce-{nonce}'" in headers["Content-Security-Policy"]
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # nothing from outside loopback
        status_code, _, text = await get(session, f"{base}/api/state", headers=jar)
        assert status_code == 200
        state = json.loads(text)
        assert [s["name"] for s in state["services"]] == ["web"]
        assert state["services"][0]["instances"][0]["state"] == "running"

        # Scripts send the token as a bearer; localhost:PORT is loopback too.
        status_code, _, _ = await get(session, f"{base}/api/state", headers={
            "Authorization": f"Bearer {token}", "Host": f"localhost:{port}"})
        assert status_code == 200

    await mesh.stop()
    assert not token_file.exists()
    assert set(mesh.files.read_state()["controller"]) == {"pid"}  # type: ignore[index]


def test_ps_drops_the_urls_of_a_controller_that_is_gone(tmp_path: Path) -> None:
    (tmp_path / "mesh.toml").write_text('[mesh]\nname = "gone"\n[services.web]\ncommand = "python app.py"\n')
    loaded = config.load(tmp_path)
    files = StateDir(loaded.state_dir)
    files.make()
    files.write_json(files.state, {"mesh": "gone", "phase": "running", "runtime": "process", "instances": [],
                                   "controller": {"pid": 1, "metrics": "http://127.0.0.1:1/metrics",
                                                  "dashboard": "http://127.0.0.1:1/?token=x"}})
    assert status(loaded)["controller"] == {"pid": None, "running": False}


KEYED = """
[services.web]
command = "python app.py"
expose = {web}

[services.sandbox]
command = "python app.py"
expose = {sandbox}
instances = {{ key = "header:X-Session", sleep_after = "{sleep_after}", max = 2, start_timeout = "30s" }}

[[routes]]
from = "web"
to = "sandbox"
"""


@pytest.mark.slow
def test_controller_metrics_show_cold_starts_sleeps_and_wakes(make_mesh: MeshMaker) -> None:
    sandbox = free_port()
    mesh = make_mesh(unique_name("dash"), KEYED.format(web=free_port(), sandbox=sandbox, sleep_after="1500ms"),
                     KEYED_APP)
    missing = mesh.run("dashboard", "--no-open", timeout=60)
    assert missing.returncode == 1 and "is not running" in missing.stderr
    up = mesh.run("up", "-d", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    controller = mesh.ps()["controller"]
    assert f"dashboard: {controller['dashboard']}" in up.stdout
    shown = mesh.run("dashboard", "--no-open", timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == controller["dashboard"], shown.stderr

    def scraped() -> str:
        answer = fetch(controller["metrics"])
        assert answer.status == 200, answer
        return answer.text

    text = scraped()
    assert metric(text, "mesh_controller_cold_start_seconds_count", service="sandbox") == 0
    assert metric(text, "mesh_controller_instances", service="web", state="running") == 1

    def call() -> int:
        return fetch(f"http://127.0.0.1:{sandbox}/", headers={"X-Session": "alice"}).status

    assert call() == 200
    text = scraped()
    assert metric(text, "mesh_controller_cold_start_seconds_count", service="sandbox", kind="cold") == 1
    assert metric(text, "mesh_controller_cold_start_seconds_sum", service="sandbox", kind="cold") > 0
    assert metric(text, "mesh_controller_instances", service="sandbox", state="running") == 1

    wait_until(lambda: metric(scraped(), "mesh_controller_sleeps_total", service="sandbox") == 1, every=0.2,
               what="alice's instance went to sleep")
    assert metric(scraped(), "mesh_controller_instances", service="sandbox", state="sleeping") == 1
    assert call() == 200
    text = scraped()
    assert metric(text, "mesh_controller_cold_start_seconds_count", service="sandbox", kind="wake") == 1
    assert metric(text, "mesh_controller_cold_start_seconds_count", service="sandbox", kind="cold") == 1

    done = mesh.run("down", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dashboard" not in mesh.ps()["controller"]


def _browser() -> tuple[Any, str]:
    """playwright's async API and Debian's chromium, or a skip saying which is missing."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian's `chromium` package; scripts/setup.sh test installs it)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("no playwright module (the `test` extras install it)")
    return async_playwright, chromium


@pytest.mark.slow
async def test_the_dashboard_in_a_browser_follows_requests_and_keyed_instances(make_mesh: MeshMaker) -> None:
    async_playwright, chromium = _browser()
    web, sandbox = free_port(), free_port()
    # Awake for 3 s after a request: the page, polling every second, sees it running even on a slow machine.
    mesh = make_mesh(unique_name("dash"), KEYED.format(web=web, sandbox=sandbox, sleep_after="3s"), KEYED_APP)
    popen = mesh.up()
    await asyncio.to_thread(mesh.wait_phase, "running", 120)
    url = (await asyncio.to_thread(mesh.ps))["controller"]["dashboard"]
    await asyncio.to_thread(wait_until, lambda: f"dashboard: {url}" in mesh.output(), what=mesh.output)

    async def send(port: int, path: str = "/", **headers: str) -> int:
        return (await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}{path}", headers=headers)).status

    async def text_of(page: Any, selector: str, expected: str) -> None:
        await page.wait_for_function(
            "([selector, expected]) => { const found = document.querySelector(selector);"
            " return found !== null && found.textContent === expected; }",
            arg=[selector, expected], timeout=90_000, polling=200)

    requests = '[data-service="web"] [data-field="requests"]'
    alice = '[data-service="sandbox"] tr[data-instance] [data-field="state"]'
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            # A script or style the page's Content-Security-Policy blocks, a failed load: said on the console.
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            await page.goto(url)
            assert page.url == url.partition("?")[0]  # the token went into a cookie, out of the address bar
            await page.wait_for_selector(requests, timeout=90_000)
            before = int(await page.text_content(requests) or "0")

            for _ in range(5):
                assert await send(web) == 200
            await page.wait_for_function(
                "([selector, least]) => Number(document.querySelector(selector).textContent) >= least",
                arg=[requests, before + 5], timeout=90_000, polling=200)

            # A keyed instance: none before its key's first request; running after it; asleep when idle;
            # running again after the next one.
            assert await page.locator('[data-service="sandbox"] tr[data-instance]').count() == 0
            assert await send(sandbox, **{"X-Session": "alice"}) == 200
            await text_of(page, alice, "running")
            assert await page.text_content('[data-service="sandbox"] [data-field="key"]') == "alice"
            await text_of(page, alice, "sleeping")
            assert await send(sandbox, **{"X-Session": "alice"}) == 200
            await text_of(page, alice, "running")

            # The live tap of web shows a request as it passes.
            await page.select_option("#tap-service", "web")
            await page.click("#tap-button")
            await page.wait_for_function(
                "() => document.getElementById('tap-status-line').textContent.startsWith('listening')",
                timeout=90_000, polling=200)

            async def tapped() -> bool:
                await send(web, "/seen-by-the-tap")
                return await page.locator("#tap-rows td", has_text="/seen-by-the-tap").count() > 0

            await eventually(tapped, timeout=90, every=0.5, what="a tapped request on the page")
            await page.click("#tap-button")
        finally:
            await browser.close()
    assert errors == []

    popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(popen.wait, 90) == 0
    assert "dashboard" not in (mesh.files.read_state() or {}).get("controller", {})
    assert not (mesh.state_dir / TOKEN_FILE).exists()
