"""Federation specs: how a client reaches a federation, whatever the transport.

A spec is a small JSON document (usually the file that ``dfm-prefect federation
up`` writes) whose ``transport`` key selects the transport; the rest is that
transport's own pydantic ``Spec`` model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports import transport_class
from dfm_prefect.transports.base import reveal

FEDERATION_ENV = "DFM_FEDERATION"
"""Environment variable naming the federation file used when a runner is given none."""


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | BaseModel | None) -> BaseModel:
    """Validate a federation spec from a file path, a mapping or a spec model.

    With ``None``, the file named by ``$DFM_FEDERATION`` is used.
    """
    if isinstance(source, BaseModel):
        return source
    if source is None:
        env = os.environ.get(FEDERATION_ENV)
        if not env:
            raise ConfigError(
                "no federation given: pass FederationTaskRunner(federation=...) a federation file, "
                f"spec or block, or set {FEDERATION_ENV} to a federation file"
            )
        source = env
    origin = "federation spec"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        try:
            source = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read federation file {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"federation file {path} is not JSON: {exc}") from None
    if not isinstance(source, dict) or not isinstance(source.get("transport"), str):
        raise ConfigError(f"{origin}: a federation spec is a mapping with a 'transport' key")
    cls = transport_class(source["transport"])
    try:
        return cls.Spec.model_validate(source)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{origin} is not a valid {source['transport']} federation spec: {problems}") from None


def spec_key(spec: BaseModel) -> str:
    """A stable identity for a spec (secrets included, never logged)."""
    data = spec.model_dump(mode="python")
    return json.dumps(reveal(data), sort_keys=True, default=str)


