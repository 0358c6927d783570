"""``/docs`` and ``/redoc`` render in a real Chromium with every other host unreachable.

``pipeline serve`` runs as a subprocess; the browser aborts any request that is not
to it (as on a machine without internet) and records it. FastAPI's stock pages
would stay blank here: they load Swagger UI and ReDoc from a CDN.

ReDoc's script itself asks for one thing elsewhere: Redocly's logo in its menu, an
image it hides when it does not load. That one request is allowed, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.integration.browser import chromium
from tests.integration.support import Server, Stack, start_server, stop_server, write_config

RENDER_TIMEOUT_MS = 20_000  # the page's script has drawn the operations by then
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # hidden by ReDoc when offline


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("docs")
    stack = Stack(redis_url, write_config(tmp / "pipeline.toml"), tmp)
    server = start_server(stack, "api", ["serve", "--host", "127.0.0.1", "--insecure-local"],
                          stack.env(), "/healthz")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


def offline_page(browser: Any, api: Server) -> tuple[Any, list[str]]:
    """A page that can reach only ``api``; the list collects what else it asked for."""
    elsewhere: list[str] = []
    page = browser.new_page()

    def route(r: Any) -> None:
        if urlsplit(r.request.url).netloc == f"127.0.0.1:{api.port}":
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort("internetdisconnected")

    page.route("**/*", route)
    return page, elsewhere


def test_swagger_ui_renders_the_operations_offline(browser: Any, api: Server) -> None:
    from playwright.sync_api import expect

    page, elsewhere = offline_page(browser, api)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(api.url("/docs"))
    operation = page.locator(".opblock-summary-path", has_text="/events/batch")
    expect(operation).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(page.locator(".opblock-summary-path[data-path='/events']")).to_be_visible()
    assert (elsewhere, failed) == ([], [])


def test_redoc_renders_the_operations_offline(browser: Any, api: Server) -> None:
    from playwright.sync_api import expect

    page, elsewhere = offline_page(browser, api)
    page.goto(api.url("/redoc"))
    expect(page.get_by_role("heading", name="pipeline ingest")).to_be_visible(
        timeout=RENDER_TIMEOUT_MS)
    expect(page.get_by_text("/events/batch").first).to_be_attached()
    assert set(elsewhere) <= {REDOC_LOGO}
