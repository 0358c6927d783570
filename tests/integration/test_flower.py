"""Flower tells the truth: task states through Flower's own HTTP API and its Tasks page
in a real Chromium (Playwright), against real workers.

One stack for the module: a ``standard`` worker, a ``held`` worker whose retries
wait an hour (its retry mover polls once a minute, so nothing it scheduled runs
during the test), a ``batched`` worker, and Flower with basic auth, started before
any event so it sees every task event. What each test reads is Flower's
``/api/tasks``: the state Celery's events gave each task, and its exception.

The browser test drives Debian's Chromium (:mod:`tests.integration.browser`);
with ``PIPELINE_TEST_SCREENSHOTS=docs/img`` it refreshes the README's screenshot.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.events import Event
from pipeline.producer.results import PublishResult
from tests.integration.browser import chromium
from tests.integration.support import (
    Server,
    Stack,
    get,
    start_server,
    stop_server,
    wait_for,
    write_config,
)

FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-states-pw"
AUTH = (FLOWER_USER, FLOWER_PASSWORD)
FLOWER_TIMEOUT_S = 30.0  # Flower shows a task's final state within this
MOVER_POLL_S = "60"  # the held worker's retry mover: first look a minute after start
REDACT_PATHS = ["payload.card", "payload.user_id"]
CARD = "4111111111111111"  # a payload value failure text quotes; Flower must not show it

TIERS = """
[tiers.held]
queue = "held"
concurrency = 1
prefetch_multiplier = 1
max_retries = 1
backoff_base_s = 3600
backoff_max_s = 3600
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5

[tiers.batched]
queue = "batched"
concurrency = 1
prefetch_multiplier = 1
batch_size = 10
max_retries = 1
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5
"""


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("flower")
    config = write_config(tmp / "pipeline.toml", extra=TIERS)
    config.write_text(f"redact_paths = {json.dumps(REDACT_PATHS)}\n" + config.read_text())
    s = Stack(redis_url, config, tmp)
    try:
        started = [s.start_worker("standard", wait=False), s.start_worker("batched", wait=False),
                   s.start_worker("held", wait=False,
                                  env={"PIPELINE_RETRY_POLL_INTERVAL_S": MOVER_POLL_S})]
        for worker in started:
            worker.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[Server]:
    env = {**stack.env(), "PIPELINE_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    server = start_server(stack, "flower", ["flower"], env, "/healthcheck")
    try:
        # Flower hears task events only once its receiver has subscribed, which can be
        # after /healthcheck answers: send a probe a second until Flower sees one through
        probes: list[str] = []

        def seen() -> bool:
            if len(probes) < 1 + int(time.monotonic() - started):
                probes.extend(stack.publish("demo.ok").task_ids)
            return any(state_of(server, task_id) == "SUCCESS" for task_id in probes[-3:])

        started = time.monotonic()
        wait_for(seen, FLOWER_TIMEOUT_S, "Flower to see a first task", 0.2)
        yield server
    finally:
        stop_server(server)


def tasks(flower: Server, **query: str) -> dict[str, dict[str, Any]]:
    status, body = get(flower.url(f"/api/tasks?{urllib.parse.urlencode(query)}"), AUTH)
    assert status == 200, body
    return dict(json.loads(body))


def state_of(flower: Server, task_id: str) -> str | None:
    status, body = get(flower.url(f"/api/task/info/{task_id}"), AUTH)
    return str(json.loads(body)["state"]) if status == 200 else None


def listed(flower: Server, state: str, task_id: str) -> dict[str, Any]:
    """The task as ``/api/tasks?state=<state>`` lists it, once it does."""
    def find() -> dict[str, Any] | None:
        return tasks(flower, state=state).get(task_id)

    return wait_for(find, FLOWER_TIMEOUT_S, f"Flower to list {task_id} as {state}",
                    interval_s=0.2)


@pytest.fixture(scope="module")
def sent(stack: Stack, flower: Server) -> dict[str, PublishResult]:
    """One event of each kind; Flower is up before any is sent."""
    return {
        "ok": stack.publish("demo.ok"),
        "invalid": stack.publish("demo.invalid"),
        "exhausted": stack.publish("demo.fail"),
        "retrying": stack.publish("demo.ok", tier="held", payload={"poison": True}),
        "deferred": stack.publish("demo.retry_after", payload={"delay_s": 600}),
        "retried_then_ok": stack.publish("demo.retry_after",
                                         payload={"delay_s": 0.2, "fail_times": 1}),
        "leaky_invalid": stack.publish("demo.typed", payload={"user_id": f"card-{CARD}"}),
        "leaky_retry": stack.publish("demo.echo", tier="held", payload={"card": CARD}),
    }


def test_failure_text_flower_shows_masks_redact_paths(
    stack: Stack, flower: Server, sent: dict[str, PublishResult],
) -> None:
    dead = listed(flower, "FAILURE", sent["leaky_invalid"].task_ids[0])
    retrying = listed(flower, "RETRY", sent["leaky_retry"].task_ids[0])
    for task in (dead, retrying):
        assert CARD not in json.dumps(task), task
        assert "[redacted]" in task["exception"]
        assert "[redacted]" in task["traceback"]
    assert "input_value='[redacted]'" in dead["exception"]  # pydantic's own error, masked
    assert "demo.echo refused payload {'card': '[redacted]'}" in retrying["traceback"]
    record = stack.wait_dlq(str(sent["leaky_invalid"].id))
    assert CARD in record.message  # the DLQ record keeps what was raised; views mask


def test_failure_log_lines_mask_redact_paths(
    stack: Stack, flower: Server, sent: dict[str, PublishResult],
) -> None:
    listed(flower, "RETRY", sent["leaky_retry"].task_ids[0])
    listed(flower, "FAILURE", sent["leaky_invalid"].task_ids[0])
    logs = "".join(w.log() for w in stack.workers)
    assert "handler demo.echo attempt 1 failed" in logs
    assert f"event {sent['leaky_invalid'].id} handler demo.typed dead-lettered" in logs
    assert CARD not in logs


def test_a_dead_lettered_task_is_failure_with_its_exception_message_and_reason(
    stack: Stack, flower: Server, sent: dict[str, PublishResult],
) -> None:
    event = sent["invalid"]
    task = listed(flower, "FAILURE", event.task_ids[0])
    record = stack.wait_dlq(str(event.id))
    assert task["name"] == "pipeline.handle[demo.invalid]"
    assert task["exception"] == (
        "DeadLettered('dead-lettered (permanent_error) after attempt 1: "
        "pipeline.errors.PermanentError: demo.invalid can never succeed "
        f"[DLQ record {record.id}]')")
    assert "PermanentError: demo.invalid can never succeed" in task["traceback"]


def test_a_task_whose_retries_ran_out_is_failure_after_its_last_attempt(
    flower: Server, sent: dict[str, PublishResult],
) -> None:
    task = listed(flower, "FAILURE", sent["exhausted"].task_ids[0])
    assert "dead-lettered (retries_exhausted) after attempt 3: " \
           "pipeline.demo.DemoTransientError: demo.fail always fails (attempt 3)" \
           in task["exception"]


def test_a_scheduled_retry_is_retry_with_its_exception_and_due_time(
    flower: Server, sent: dict[str, PublishResult],
) -> None:
    task = listed(flower, "RETRY", sent["retrying"].task_ids[0])
    assert task["name"] == "pipeline.handle[demo.ok]"
    exception = str(task["exception"])
    assert exception.startswith("RetryScheduled('attempt 1 of 2 failed: "
                                "pipeline.demo.DemoTransientError: poisoned event; "
                                "attempt 2 due at ")
    due = datetime.fromisoformat(exception.split("due at ", 1)[1].split(" ", 1)[0])
    assert due.timestamp() > time.time()  # still to come: the schedule holds it
    assert "poisoned event" in task["traceback"]  # the handler's own traceback


def test_a_deferral_is_retry_with_its_reason(
    flower: Server, sent: dict[str, PublishResult],
) -> None:
    task = listed(flower, "RETRY", sent["deferred"].task_ids[0])
    assert str(task["exception"]).startswith(
        "Deferred('deferred (requested): attempt 1 runs again at ")
    assert "no attempt used" in task["exception"]


def test_successes_are_success_and_nothing_failed_is(
    flower: Server, sent: dict[str, PublishResult],
) -> None:
    for kind in ("ok", "retried_then_ok"):
        task = listed(flower, "SUCCESS", sent[kind].task_ids[0])
        assert task["result"] == "'succeeded'"
    failed = tasks(flower, state="FAILURE")
    retrying = tasks(flower, state="RETRY")
    for kind in ("ok", "retried_then_ok"):
        assert sent[kind].task_ids[0] not in failed
        assert sent[kind].task_ids[0] not in retrying


def test_a_duplicate_delivery_is_success_with_a_result_naming_the_skip(
    stack: Stack, flower: Server,
) -> None:
    message = Event(type="demo.ok", source="tests").to_message()
    first = stack.rt.publisher.publish(message)
    task_id = first.task_ids[0]
    stack.wait_effect(str(first.id))
    assert listed(flower, "SUCCESS", task_id)["result"] == "'succeeded'"
    again = stack.rt.messages.spec(message, handler="demo.ok", tier="standard",
                                    task_id=task_id, attempt=1)
    stack.rt.app.tasks["pipeline.handle"].apply_async(
        args=again.args, kwargs=again.kwargs, **again.apply_async_options())  # type: ignore[arg-type]
    wait_for(lambda: tasks(flower, state="SUCCESS").get(task_id, {}).get("result")
             == "'already_done'", FLOWER_TIMEOUT_S, "Flower to show the skipped delivery")
    assert stack.effects(str(first.id)) == 1


def test_a_batch_is_failure_only_when_one_of_its_events_was_dead_lettered(
    stack: Stack, flower: Server,
) -> None:
    def batch(*payloads: dict[str, Any]) -> list[PublishResult]:
        return stack.rt.publisher.publish_many(
            [{"type": "demo.typed", "source": "tests", "tier": "batched", "payload": p}
             for p in payloads])

    good = batch({"user_id": 1, "amount": 5}, {"user_id": 2, "amount": 6})
    mixed = batch({"user_id": 3, "amount": 7}, {"amount": 8})  # no user_id: invalid
    stack.wait_dlq(str(mixed[1].id))
    for r in (*good, mixed[0]):
        stack.wait_effect(str(r.id))

    def batches(state: str) -> list[dict[str, Any]]:
        return [t for t in tasks(flower, state=state).values()
                if str(t["name"]).startswith("pipeline.handle_batch")]

    (failed,) = wait_for(lambda: batches("FAILURE"), FLOWER_TIMEOUT_S, "a failed batch")
    assert str(failed["exception"]).startswith(
        "BatchDeadLettered('1 of 2 events dead-lettered (invalid_payload=1); per event: ")
    wait_for(lambda: any(t["result"] == "'batch:succeeded=2'" for t in batches("SUCCESS")),
             FLOWER_TIMEOUT_S, "the all-good batch to be SUCCESS")


def test_flowers_tasks_page_filtered_to_failure_lists_the_dead_lettered_task(
    stack: Stack, flower: Server, sent: dict[str, PublishResult], tmp_path: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium()
    dead = sent["invalid"].task_ids[0]
    succeeded = sent["ok"].task_ids[0]
    listed(flower, "FAILURE", dead)
    listed(flower, "SUCCESS", succeeded)
    shots = Path(os.environ.get("PIPELINE_TEST_SCREENSHOTS") or tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            wrong = browser.new_context(
                http_credentials={"username": FLOWER_USER, "password": "wrong"})
            refused = wrong.new_page().goto(flower.url("/tasks?state=FAILURE"))
            assert refused is not None
            assert refused.status == 401
            context = browser.new_context(
                http_credentials={"username": FLOWER_USER, "password": FLOWER_PASSWORD},
                viewport={"width": 1600, "height": 900})
            page = context.new_page()
            opened = page.goto(flower.url("/tasks?state=FAILURE"))
            assert opened is not None
            assert opened.ok
            row = page.locator("#tasks-table tbody tr", has_text=dead)
            expect(row).to_have_count(1, timeout=FLOWER_TIMEOUT_S * 1000)
            expect(row).to_contain_text("FAILURE")
            expect(row).to_contain_text("pipeline.handle[demo.invalid]")
            expect(row).to_contain_text("dead-lettered (permanent_error)")  # the column
            table = page.locator("#tasks-table tbody")
            expect(table).not_to_contain_text(succeeded)
            expect(table).not_to_contain_text("SUCCESS")
            page.screenshot(path=str(shots / "flower-failure.png"))
        finally:
            browser.close()
    assert (shots / "flower-failure.png").stat().st_size > 10_000
