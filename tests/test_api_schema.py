"""The API checked against its own OpenAPI schema by schemathesis: generated requests to every
operation, in process (ASGI), with every check schemathesis has (no server errors, status
codes, content types, headers and bodies as the schema declares them, invalid data refused,
valid data accepted), a fixed seed and a fixed budget of examples."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from api.main import create_app
from service.settings import Settings
from tests.conftest import TEST_LIMITS

EXAMPLES_PER_OPERATION = 15
ADMIN_TOKEN = "schema-admin-token"
# Operations whose input has rules that JSON Schema cannot say, each refused with a 422 that
# names the field (and documented so): a body that fits the schema may still be refused.
CHECKED_BEYOND_THE_SCHEMA = {
    # Any bytes fit a binary body; only reading them tells a model file from another.
    ("POST", "/v1/models"),
    ("PUT", "/v1/internal/jobs/{job_id}/trials/{trial_key}/checkpoint"),
    # The spec's cross-field rules: beta only for the methods that take it, a source only for
    # evaluate jobs, every sweep value valid for its field, the server's limits.
    ("POST", "/v1/jobs"),
}

# The schema is read when the module is collected, so the app is made then; its database and
# bootstrap admin come with its lifespan, which the fixture below runs around the tests.
HOME = Path(tempfile.mkdtemp(prefix="advorch-schema-"))
APP = create_app(Settings(home=HOME, api_token=ADMIN_TOKEN, **TEST_LIMITS))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TestClient over httpx


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Iterator[None]:
    with TestClient(APP):
        yield
    shutil.rmtree(HOME, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_answers_as_its_schema_says(case: schemathesis.Case) -> None:
    excluded = []
    if (case.method, case.operation.path) in CHECKED_BEYOND_THE_SCHEMA:
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, excluded_checks=excluded
    )
