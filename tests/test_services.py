"""Declared HTTP services: a real model server (FastAPI, uvicorn) on 127.0.0.1 with its own OpenAPI document.

The site calls it with a bearer token from its own environment. Bad answers
(500, a hang, a redirect to another host, a gigabyte) end in clear errors and
the site keeps serving; parameters are checked against the document first.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from dfm_prefect.core.errors import InvalidParametersError, OperationFailedError, UnknownOperationError
from dfm_prefect.testing.model_service import ModelService, predict
from tests.test_adapters_support import InProcessSite

TOKEN = "model-token-8d1f5c2a9e"


@pytest.fixture(scope="module")
def service():
    with ModelService(token=TOKEN) as svc:
        yield svc


@pytest.fixture(scope="module")
def site(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    openapi = service.write_openapi(root / "risk-openapi.json")
    rng = np.random.default_rng(3)
    visits = pd.DataFrame({"ward": rng.choice(["cardio", "neuro"], 300), "age": rng.integers(0, 95, 300), "stay_days": rng.gamma(2.0, 2.5, 300).round(2)})
    visits.to_parquet(root / "visits.parquet", index=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("DFM_RISK_TOKEN", TOKEN)
    services = [
        {
            "name": "risk",
            "base_url": service.base_url,
            "openapi": str(openapi),
            "headers": {"Authorization": "Bearer ${env:DFM_RISK_TOKEN}"},
            "timeout_s": 2,
            "max_response_bytes": 1 << 20,
            "operations": {
                "predict": {"result": "table", "data_field": "rows", "response_field": "predictions", "append_to_input": "risk"},
                "describeModel": {"result": "value"},
                "fail": {},
                "hang": {},
                "moved": {},
                "huge": {},
            },
        }
    ]
    with InProcessSite(
        tmp_path_factory.mktemp("services-store"), [{"name": "visits", "url": f"file://{root / 'visits.parquet'}"}],
        operations=["table.groupby_aggregate"], services=services,
        export={"kinds": ["value", "table", "aggregate"], "error_detail": "message"},
    ) as site:
        yield site, visits
    mp.undo()


def test_inference_runs_next_to_the_data_and_its_predictions_stay_as_a_table(site, service):
    site, visits = site
    scores = site.ref("service.risk.predict", data="visits")
    assert scores.kind == "table"
    got = site.call("service.risk.predict", data="visits")
    np.testing.assert_allclose(got["risk"], predict(service.weights, visits.to_dict("records")))
    assert list(got.columns) == ["ward", "age", "stay_days", "risk"]
    summary = site.call("table.groupby_aggregate", data=scores.model_dump(mode="json"), by=["ward"],
                        aggregations={"n": {"column": "risk", "func": "count"}, "risk": {"column": "risk", "func": "sum"}})
    assert summary["n"].sum() == 300
    np.testing.assert_allclose(summary["risk"].sum(), got["risk"].sum())


def test_path_and_query_parameters_are_typed_from_the_document(site, service):
    site, _ = site
    got = site.call("service.risk.describe_model", model_id="risk", digits=2)
    assert got["weights"] == [round(float(w), 2) for w in service.weights]
    with pytest.raises(InvalidParametersError, match="digits"):
        site.call("service.risk.describe_model", model_id="risk", digits="two")
    with pytest.raises(InvalidParametersError, match="404"):  # '/' and '..' stay inside one quoted path segment
        site.call("service.risk.describe_model", model_id="../../v1/fail")
    with pytest.raises(InvalidParametersError, match="url"):
        site.call("service.risk.describe_model", model_id="risk", url="http://elsewhere/")


def test_bodies_are_checked_against_the_schema_before_the_call(site):
    site, _ = site
    with pytest.raises(InvalidParametersError, match="at threshold: 2 is greater than the maximum"):
        site.call("service.risk.predict", data="visits", body={"threshold": 2})
    with pytest.raises(InvalidParametersError, match="body: Extra inputs"):
        site.call("service.risk.describe_model", model_id="risk", body={"x": 1})
    with pytest.raises(UnknownOperationError):
        site.call("service.risk.delete_everything")


def test_misbehaving_services_end_in_clear_errors_and_the_site_keeps_serving(site):
    site, _ = site
    with pytest.raises(OperationFailedError, match="500"):
        site.call("service.risk.fail")
    started = time.monotonic()
    with pytest.raises(OperationFailedError, match="within 2 s"):
        site.call("service.risk.hang")
    assert time.monotonic() - started < 10
    with pytest.raises(OperationFailedError, match="redirect"):
        site.call("service.risk.moved")
    started = time.monotonic()
    with pytest.raises(OperationFailedError, match="more than 1048576 bytes"):
        site.call("service.risk.huge")
    assert time.monotonic() - started < 10
    assert site.call("service.risk.describe_model", model_id="risk")["model"] == "risk"


def test_the_token_never_leaves_the_site(site, service):
    site, _ = site
    answers = [
        site.worker.describe().model_dump_json(),
        site.run("service.risk.fail").model_dump_json(),
        site.run("service.risk.describe_model", model_id="x").model_dump_json(),
        site.run("service.risk.describe_model", model_id="risk").model_dump_json(),
    ]
    assert all(TOKEN not in text for text in answers)
    assert TOKEN not in site.worker.redactor.text(f"the token is {TOKEN}")


def test_the_catalog_shows_each_operation_with_the_documents_schema(site):
    site, _ = site
    operations = json.loads(site.worker.describe().model_dump_json())["operations"]
    schema = operations["service.risk.describe_model"]["params_schema"]
    assert schema["required"] == ["model_id"] and schema["properties"]["digits"]["anyOf"][0]["type"] == "integer"
    predict_schema = operations["service.risk.predict"]["params_schema"]
    assert "data" in predict_schema["required"] and "rows" in json.dumps(predict_schema["properties"]["body"])
    assert operations["service.risk.predict"]["result_kind"] == "table"
