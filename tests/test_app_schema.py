"""The API against its own OpenAPI schema (schemathesis): generated requests, valid and
invalid, with the admin token, on SQLite and PostgreSQL. Every answer must be documented
(status, content type, body schema, headers), invalid input must be refused with a 4xx,
and nothing may be a server error. Bounded to stay a CI test: a few examples per operation.

Not checked: that every schema-valid request is accepted. Some cannot be: task names the
active pool does not have, data paths that do not exist. Both are documented 422s."""

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from service_fixtures import ADMIN, store_with

from app.main import create_app

EXAMPLES = 20  # per operation and mode


@pytest.fixture(scope="module")
def api_schema(databases, tmp_path_factory, pool):
    config, _ = store_with(databases, tmp_path_factory.mktemp("schema"), pool.root)
    with TestClient(create_app(config)) as client:  # runs the lifespan: services up
        yield schemathesis.openapi.from_asgi("/openapi.json", client.app)


# schemathesis' own pytest plugin does not run on this pytest; hypothesis drives it here.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_matches_its_schema(api_schema, mode):
    calls = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call_and_validate(headers=ADMIN, excluded_checks=[positive_data_acceptance])
            calls.append((case.operation.label, response.status_code))

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (no parameters, or only free strings)
            assert mode is GenerationMode.NEGATIVE, operation.label
    if mode is GenerationMode.POSITIVE:
        assert {label for label, _ in calls} == {r.ok().label for r in api_schema.get_all_operations()}
    assert all(status < 500 or status == 503 for _, status in calls)
    print(f"schemathesis {mode.value}: {len(calls)} calls over {len({label for label, _ in calls})} operations")
