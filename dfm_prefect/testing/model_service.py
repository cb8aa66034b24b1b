"""A real HTTP inference service on 127.0.0.1 for tests and demos: a small model behind a FastAPI app.

The model is a logistic regression fitted (NumPy, Newton's method) on synthetic
visits when the service starts; the app publishes its OpenAPI document and,
besides ``predict``, endpoints that misbehave on purpose: one that fails with
500, one that hangs, one that redirects to another host, and one that streams
a gigabyte. A bearer token guards every endpoint.

Example:

```python
from dfm_prefect.testing.model_service import ModelService

with ModelService(token="t0ken-for-tests") as service:
    service.write_openapi("risk-openapi.json")
    service.base_url          # http://127.0.0.1:PORT
```
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from dfm_prefect.transports.base import free_port

FEATURES = ("age", "stay_days")


class Visit(BaseModel):
    age: int = Field(ge=0, le=130)
    stay_days: float = Field(ge=0)


class PredictRequest(BaseModel):
    rows: list[Visit] = Field(min_length=1, max_length=100_000)
    threshold: float = Field(default=0.5, ge=0, le=1)


class PredictAnswer(BaseModel):
    predictions: list[float]
    flagged: int


def fit_risk_model(seed: int = 0, rows: int = 4000) -> np.ndarray:
    """Weights (intercept first) of a logistic regression of readmission on age and stay, fitted on synthetic data."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(rows), rng.integers(0, 95, rows) / 50.0, rng.gamma(2.0, 2.5, rows) / 5.0])
    truth = np.array([-2.0, 0.8, 0.6])
    y = rng.random(rows) < 1 / (1 + np.exp(-x @ truth))
    w = np.zeros(3)
    for _ in range(25):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = x.T @ (x * (p * (1 - p))[:, None])
        w -= np.linalg.solve(hessian, x.T @ (p - y))
    return w


def predict(weights: np.ndarray, rows: list[dict[str, Any]]) -> list[float]:
    """Readmission risk for visit rows (``age``, ``stay_days``)."""
    x = np.array([[1.0, float(r["age"]) / 50.0, float(r["stay_days"]) / 5.0] for r in rows]).reshape(-1, 3)
    return [float(v) for v in 1 / (1 + np.exp(-x @ weights))]


def build_app(weights: np.ndarray, token: str) -> Any:
    from fastapi import Depends, FastAPI, Header, HTTPException
    from fastapi.responses import RedirectResponse, StreamingResponse

    def authorized(authorization: str = Header(default="")) -> None:
        if authorization != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="unauthorized")

    app = FastAPI(title="readmission risk", version="1", dependencies=[Depends(authorized)])

    @app.post("/v1/predict", operation_id="predict", response_model=PredictAnswer, summary="Readmission risk per visit.")
    def predict_route(request: PredictRequest) -> PredictAnswer:
        scores = predict(weights, [row.model_dump() for row in request.rows])
        return PredictAnswer(predictions=scores, flagged=sum(s >= request.threshold for s in scores))

    @app.get("/v1/models/{model_id}", operation_id="describeModel", summary="A model's coefficients.")
    def describe(model_id: str, digits: int = 3) -> dict[str, Any]:
        if model_id != "risk":
            raise HTTPException(status_code=404, detail="no such model")
        return {"model": model_id, "weights": [round(float(w), max(0, min(digits, 10))) for w in weights], "features": list(FEATURES)}

    @app.get("/v1/fail", operation_id="fail")
    def fail() -> dict[str, Any]:
        raise RuntimeError("the model server broke")

    @app.get("/v1/hang", operation_id="hang")
    async def hang() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    @app.get("/v1/moved", operation_id="moved")
    def moved() -> Any:
        return RedirectResponse("http://192.0.2.1/steal", status_code=307)

    @app.get("/v1/huge", operation_id="huge")
    def huge() -> Any:
        block = b"[" + b"0," * (1 << 19) + b"0]"

        def stream() -> Any:
            for _ in range(1024):  # about a gigabyte
                yield block

        return StreamingResponse(stream(), media_type="application/json")

    return app


class ModelService:
    """The app served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, token: str, port: int | None = None, seed: int = 0) -> None:
        import uvicorn

        self.token = token
        self.port = port or free_port()
        self.weights = fit_risk_model(seed)
        self.app = build_app(self.weights, token)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="dfm-model-service", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_openapi(self, path: str | Path) -> Path:
        """Write the app's OpenAPI document (what a site administrator ships with the config)."""
        path = Path(path)
        path.write_text(json.dumps(self.app.openapi(), indent=1))
        return path

    def start(self) -> ModelService:
        self._thread.start()
        started = threading.Event()
        # uvicorn sets `started` from its own loop; wait for it with a bounded number of short waits.
        for _ in range(200):
            if self._server.started:
                started.set()
                break
            self._thread.join(0.05)
        if not started.is_set():
            raise RuntimeError("the model service did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(10)

    def __enter__(self) -> ModelService:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
