"""Schemathesis against the served OpenAPI schema: generated valid and invalid requests for every route
never get a 5xx, and what comes back matches the schema. The Gradio UI is mounted at / as in production;
the schema holds the API's routes only (dreamlab's under /api, the A1111-compatible ones under /sdapi/v1)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from dreamlab.loading.model import load_model
from dreamlab.models.tiny import make_tiny_model
from dreamlab.server.app import create_app
from dreamlab.server.service import Limits

# A1111's txt2img and img2img answer only once their job has run, so they are fuzzed against an app whose
# worker runs (with limits that keep each job small); every other route against one without a worker,
# where the fuzzer's many jobs stay queued and cost nothing.
GENERATING = r"^/sdapi/v1/(txt2img|img2img)$"
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
LIMITS = dict(max_steps=30, max_side=64, max_batch=2, max_body_bytes=2**20)


def _schema(tmp_path_factory, **app_options):
    model = load_model(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))
    app = create_app(model, tmp_path_factory.mktemp("data"), ui=True, **app_options)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert all(path.startswith(("/api/", "/sdapi/v1/")) for path in schema.raw_schema["paths"])
    return schema


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    return _schema(tmp_path_factory, limits=Limits(**LIMITS, max_queue=100_000), run_worker=False)


@pytest.fixture(scope="module")
def generating_schema(tmp_path_factory):
    return _schema(tmp_path_factory, limits=Limits(max_steps=8, max_side=32, max_batch=2, max_body_bytes=2**20),
                   preview_every=0)


schema = schemathesis.pytest.from_fixture("api_schema")
generating = schemathesis.pytest.from_fixture("generating_schema")


@schema.exclude(path_regex=GENERATING).parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors(case):
    case.call_and_validate(checks=CHECKS)


@generating.include(path_regex=GENERATING).parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors_from_a1111_generation(case):
    case.call_and_validate(checks=CHECKS)
