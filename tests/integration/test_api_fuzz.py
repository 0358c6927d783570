"""Schemathesis against the served OpenAPI schema: generated requests, zero 5xx,
auth enforced on every route that reads or writes events.

Cases are drawn with schemathesis' hypothesis strategies directly (its pytest
plugin does not support pytest 9 yet).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from pipeline.api import create_api
from tests.integration.test_api import AUTH, TOKEN, make_runtime

OPEN_ROUTES = {"/healthz", "/readyz"}
SIGNED_ROUTES = {"/webhooks/{name}"}  # no token: a signature, or 401 (404 for unknown names)
WEBHOOKS = {"github": {"scheme": "github", "secret_env": "FUZZ_GH_SECRET", "type": "demo.ok"}}
EXAMPLES_PER_ROUTE = 600  # generated requests per operation, with a token


@pytest.fixture(scope="module")
def api_schema(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    api = create_api(make_runtime(redis_url, tmp, webhooks=WEBHOOKS), token=TOKEN,
                     environ={"FUZZ_GH_SECRET": "fuzz-secret-0123456789abcdef"})
    return schemathesis.openapi.from_asgi("/openapi.json", api)


def operations(schema: Any) -> list[Any]:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/events", "/events/batch", "/healthz", "/readyz"}
    return ops


def test_generated_requests_never_get_a_5xx(api_schema: Any) -> None:
    statuses: Counter[int] = Counter()
    for op in operations(api_schema):

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(headers=AUTH)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (case.path, response.status_code, response.text)

        check()
    assert sum(statuses.values()) >= 1000, statuses
    assert statuses[202] + statuses[207] > 0, statuses  # some generated events went through


def test_every_route_that_touches_events_refuses_requests_without_a_token(
    api_schema: Any,
) -> None:
    for op in operations(api_schema):

        @given(case=op.as_strategy())
        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call()
            if case.path in OPEN_ROUTES:
                assert response.status_code < 500
            elif case.path in SIGNED_ROUTES:
                assert response.status_code in (401, 404, 413), response.status_code
            else:
                assert response.status_code == 401, (case.path, response.status_code)

        check()
