"""Schema fuzzing of the REST API (schemathesis): no generated request may cause a 5xx."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from web_fakes import FakeCaptioner  # noqa: E402

from captioner.web.app import ServeSettings, create_app  # noqa: E402

app = create_app(lambda: FakeCaptioner(), ServeSettings(max_upload_mb=1))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _lifespan():
    """Run the app's startup (model load) once, as a server would."""
    from fastapi.testclient import TestClient

    with TestClient(app):
        yield


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
