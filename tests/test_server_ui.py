"""`jora server --port P` (issue 22): the Prefect UI it serves talks to the API on port P, not 4200, and
shows the server's flows in a real browser; other web sites may not call the API from a browser (CORS)
nor reach it under their own name (a Host allow-list, against DNS rebinding);
SIGTERM stops it with status 143 and leaves no process behind.

The browser part needs Playwright and a system Chromium, as tests/test_gui.py (whose helpers it uses):
JORA_REQUIRE_BROWSER=1 (set by .ci/run) makes their absence a failure.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import urllib.request

from pipeline.deploy import server_environment
from tests.processes import assert_all_end, descendants, free_port, stop_group, wait_until
from tests.test_gui import CHROMIUM_FLAGS, JORA, _wait_up, require_chromium

FLOW = "jora-issue-22-probe"  # a flow registered through port P: the page shows it only if it asked port P


def _request(port: int, method: str, path: str, headers: dict | None = None, body: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _page_text(chromium: str, url: str, expected: str, requests: list[str]) -> str:
    """The page's text once `expected` shows, or whatever it shows after a generous wait."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(url)
        try:
            page.get_by_text(expected).first.wait_for(timeout=60_000)
        except PlaywrightTimeout:  # the assertion below reports what the page says instead
            pass
        text = page.locator("body").inner_text()
        browser.close()
    return text


def test_server_ui_uses_the_port_it_was_started_on(tmp_path):
    chromium = require_chromium("the Prefect UI browser test")
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if name not in ("PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL")}
    # A client setting for the default server, as a user who once ran `jora server` plainly has it: the
    # UI of this one must still talk to this one.
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([JORA, "server", "--port", str(port)], env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_up(f"http://127.0.0.1:{port}/api/health", server, log)
        status, _, _ = _request(port, "POST", "/api/flows/", body={"name": FLOW})
        assert status in (200, 201), status
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=30) as response:
            ui_settings = json.load(response)

        requests: list[str] = []
        for page in ("/v2/flows", "/flows"):  # Prefect's two UIs (V2 is the default)
            text = _page_text(chromium, f"http://127.0.0.1:{port}{page}", FLOW, requests)
            assert "Something went wrong" not in text and FLOW in text and "Flows" in text, (page, ui_settings,
                                                                                               text[:1500])
        api_calls = {url.split("?")[0] for url in requests if "/api/" in url}
        assert api_calls and all(url.startswith(f"http://127.0.0.1:{port}/api/") for url in api_calls), api_calls
        assert ui_settings["api_url"] == f"http://127.0.0.1:{port}/api", ui_settings

        # A page from another site may not read the API or send it JSON (the preflight is refused); the
        # server's own names may.
        for origin, allowed in ((f"http://localhost:{port}", True), ("http://evil.example", False),
                                (f"http://127.0.0.1.evil.example:{port}", False)):
            _, headers, _ = _request(port, "GET", "/api/health", {"Origin": origin})
            assert (headers.get("access-control-allow-origin") in (origin, "*")) is allowed, (origin, headers)
            status, _, _ = _request(port, "OPTIONS", "/api/flows/filter", {
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"})
            assert (status == 200) is allowed, (origin, status)

        # A request carrying another site's name (DNS rebinding) is refused; the server's own names are not.
        for name, allowed in ((f"evil.example:{port}", False), (f"localhost:{port}", True),
                              (f"127.0.0.1:{port}", True)):
            status, _, _ = _request(port, "GET", "/api/health", {"Host": name})
            assert (status == 200) is allowed and (allowed or status == 400), (name, status)
        status, _, _ = _request(port, "POST", "/api/flows/", {"Host": "evil.example"}, body={"name": "rebound"})
        assert status == 400

        # SIGTERM to jora alone: it stops Prefect's server, which it started, and ends with 143.
        children = wait_until(lambda: descendants(server.pid), "the Prefect server process", 60, server)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        assert_all_end(children)
    finally:
        stop_group(server)  # a failure above must not leave the server running


def test_server_environment_keeps_the_users_choices():
    own = server_environment("127.0.0.1", 4321, {})
    assert own["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert own["PREFECT_SERVER_API_PORT"] == "4321" and own["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert own["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"].split(",") == [
        "http://127.0.0.1:4321", "http://localhost:4321", "http://[::1]:4321"]
    assert server_environment("::1", 4321, {})["PREFECT_SERVER_UI_API_URL"] == "http://[::1]:4321/api"
    # Bound to every address, the page's own origin is the only address the UI can be given.
    assert server_environment("0.0.0.0", 4321, {})["PREFECT_SERVER_UI_API_URL"] == "/api"
    # A reverse proxy's address or the user's CORS list, in either of Prefect's spellings, is kept.
    proxy = server_environment("127.0.0.1", 4321, {"PREFECT_UI_API_URL": "https://proxy.lan/api",
                                                   "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": "https://proxy.lan"})
    assert "PREFECT_SERVER_UI_API_URL" not in proxy and proxy["PREFECT_UI_API_URL"] == "https://proxy.lan/api"
    assert "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS" not in proxy
