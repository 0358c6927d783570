"""The DLQ console in a real Chromium (Playwright) against `pipeline serve` and a real
worker: log in (a wrong token refused), see the groups, open a record, dry-run then
replay a fingerprint after the fix (the group empties, each event is processed once),
a form without its CSRF token refused, purge with confirmation.

With ``PIPELINE_TEST_SCREENSHOTS=docs/img`` it refreshes the docs' screenshots
(``dlq-console-*.png``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.demo import fixed_key
from pipeline.dlq.triage import record_fingerprint
from tests.integration.browser import chromium
from tests.integration.support import (
    Server,
    Stack,
    start_server,
    stop_server,
    wait_for,
    write_config,
)

OPS = "ops-browser-token-0123456789"
UI_TIMEOUT_MS = 15_000  # a page or element shows within this
FAILING, INVALID = 6, 3  # demo.fail and demo.invalid events dead-lettered for the test


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console-browser")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml"), tmp)
    try:
        s.start_workers("standard")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Server]:
    env = {**stack.env(), "PIPELINE_API_TOKENS": json.dumps({"ops": OPS})}
    server = start_server(stack, "api", ["serve"], env, "/healthz")
    try:
        yield server
    finally:
        stop_server(server)


def test_console_login_groups_record_replay_and_purge_in_chromium(
        stack: Stack, api: Server, tmp_path: Path) -> None:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    stack.state.delete(fixed_key("demo.fail"))
    failing = [str(stack.publish("demo.fail", payload={"order": n}).id) for n in range(FAILING)]
    invalid = [str(stack.publish("demo.invalid").id) for _ in range(INVALID)]
    wait_for(lambda: set(failing + invalid) <= {r.event_id for r in stack.rt.dlq.iter_records()},
             60, "the events in the DLQ")
    fp = record_fingerprint(stack.dlq_for(failing[0])[0])
    shots = Path(os.environ.get("PIPELINE_TEST_SCREENSHOTS") or tmp_path)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 800}).new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(api.url("/console"))
            expect(page).to_have_url(api.url("/console/login"))  # no session: the login
            page.fill("input[name=token]", "wrong-token-0123456789abcdef")
            page.click("button[type=submit]")
            expect(page.get_by_role("alert")).to_have_text("Wrong token.")
            page.screenshot(path=str(shots / "dlq-console-login.png"))

            page.fill("input[name=token]", OPS)
            page.click("button[type=submit]")
            row = page.locator(f"#groups tr[data-fingerprint='{fp}']")
            expect(row).to_contain_text("demo.fail")
            expect(row.locator("td.num")).to_have_text(str(FAILING))
            expect(row.locator("svg.spark rect")).to_have_count(1)
            page.screenshot(path=str(shots / "dlq-console-groups.png"))

            row.locator("a").click()
            expect(page.locator("#count")).to_contain_text(f"{FAILING} record(s) match")
            page.screenshot(path=str(shots / "dlq-console-records.png"))
            page.locator("#records a").first.click()
            expect(page.locator("#traceback")).to_contain_text("DemoTransientError")
            expect(page.locator("#event")).to_contain_text('"order"')
            page.screenshot(path=str(shots / "dlq-console-record.png"), full_page=True)

            page.go_back()
            stack.state.set(fixed_key("demo.fail"), "1")  # the fix is deployed
            page.click("#dry-run")
            expect(page.locator("#summary")).to_contain_text(
                f"{FAILING} of {FAILING} matching record(s) would be replayed")
            page.screenshot(path=str(shots / "dlq-console-dry-run.png"))
            assert len([r for r in stack.rt.dlq.iter_records() if r.event_id in failing]) \
                == FAILING  # a dry run changes nothing
            page.click("#confirm-replay")
            expect(page.locator("#summary")).to_contain_text(f"{FAILING} record(s) replayed")
            for event_id in failing:
                stack.wait_effect(event_id, timeout_s=30)
            page.goto(api.url("/console"))
            expect(page.locator(f"#groups tr[data-fingerprint='{fp}']")).to_have_count(0)
            time.sleep(0.5)
            assert [stack.effects(i) for i in failing] == [1] * FAILING  # each once

            page.goto(api.url("/console/records?type=demo.invalid"))
            page.click("#purge")
            expect(page.locator("#confirm-purge")).to_have_text(f"Purge {INVALID} record(s)")
            page.screenshot(path=str(shots / "dlq-console-purge.png"))
            page.locator("input[name=csrf]").evaluate_all("els => els.forEach(e => e.remove())")
            page.click("#confirm-purge")
            expect(page.get_by_role("alert")).to_contain_text("CSRF")  # refused, 403
            assert all(stack.dlq_for(i) for i in invalid)
            page.goto(api.url("/console/records?type=demo.invalid"))
            page.click("#purge")
            page.click("#confirm-purge")
            expect(page.locator("#summary")).to_contain_text(f"{INVALID} record(s) purged")
            assert not any(stack.dlq_for(i) for i in invalid)
        finally:
            browser.close()
            stack.state.delete(fixed_key("demo.fail"))
    assert (shots / "dlq-console-groups.png").stat().st_size > 10_000
