"""A bounded schemathesis run over every route of the published OpenAPI schema, on a live server.

Requests generated from the schema itself (valid ones, as schemathesis builds them: any string
where a string is allowed, numbers at their bounds, random files) must never get a 5xx, and
every answer must be one the schema documents: its status, content type, headers and body.
Bounded in examples per route and in time; derandomized, so a failure reproduces.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.support import LiveServer, tiny_settings

EXAMPLES_PER_ROUTE = 12
BUDGET_S = 60.0  # the whole run; routes still to come after it are skipped, never run long
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NOT_IMPLEMENTED = {"POST /v1/segment"}
# Generation-length settings: valid at any value the schema allows, but a generated 8,192 would
# only make the run long. Capped in the generated request, which stays valid.
LENGTH_KEYS = ("max_tokens", "max_completion_tokens", "num_predict", "max_objects")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings(request_timeout_s=60)).start()
    yield srv
    srv.stop()


def cap_lengths(value: Any) -> None:
    if isinstance(value, dict):
        for key in LENGTH_KEYS:
            if isinstance(value.get(key), int) and not isinstance(value.get(key), bool):
                value[key] = min(value[key], 4)
        for item in value.values():
            cap_lengths(item)
    elif isinstance(value, list):
        for item in value:
            cap_lengths(item)


def fuzz(operation: Any, calls: Counter[str]) -> None:
    @given(operation.as_strategy(GenerationMode.POSITIVE))
    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case: Any) -> None:
        cap_lengths(case.body)
        if operation.label in NOT_IMPLEMENTED:  # documented 501: the skill is not in the model
            response = case.call_and_validate(checks=CHECKS[1:], timeout=60)
            assert response.status_code in (401, 422, 501), response.status_code
        else:
            response = case.call_and_validate(checks=CHECKS, timeout=60)
        calls[f"{operation.label} {response.status_code}"] += 1

    run()


def test_every_route_answers_as_its_schema_says(fuzz_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every surface is in the schema
    started = time.monotonic()
    failures: dict[str, str] = {}
    calls: Counter[str] = Counter()
    for operation in operations:
        if time.monotonic() - started > BUDGET_S:
            break
        try:
            fuzz(operation, calls)
        except Exception as exc:  # keep going: report every route that fails
            failures[operation.label] = str(exc)[:2000]
    covered = {label.rsplit(" ", 1)[0] for label in calls}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert len(covered) == len(operations), (
        f"routes not reached in {BUDGET_S:g} s: {len(operations) - len(covered)}"
    )
    # Not only refusals: the generated requests reach the model on the routes that take text alone.
    assert any(label.startswith("POST /v1/query 200") for label in calls), sorted(calls)
    assert sum(calls.values()) >= 5 * len(operations), sorted(calls)
