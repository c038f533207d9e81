"""Schemathesis against the served OpenAPI schema: generated valid and invalid requests for every route
never get a 5xx, and what comes back matches the schema. The Gradio UI is mounted at / as in production;
the schema holds the API's routes only."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from dreamlab.loading.model import load_model
from dreamlab.models.tiny import make_tiny_model
from dreamlab.server.app import create_app
from dreamlab.server.service import Limits


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    model = load_model(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))
    # no worker: queued jobs stay queued, so the fuzzer's many jobs cost nothing to run
    limits = Limits(max_steps=30, max_side=64, max_batch=2, max_body_bytes=2**20, max_queue=100_000)
    app = create_app(model, tmp_path_factory.mktemp("data"), limits=limits, run_worker=False, ui=True)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert all(path.startswith("/api/") for path in schema.raw_schema["paths"])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error, content_type_conformance, response_schema_conformance])
