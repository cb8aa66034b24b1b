"""The `Federation` block: how a flow reaches its federation, with secrets kept secret.

Example:

```python
from dfm_prefect.blocks import Federation

Federation.from_file(".dfm/federation.json").save("dfm")      # once, by whoever runs the federation

@flow(task_runner=FederationTaskRunner("block:dfm"))          # any flow, any machine with the block
def my_flow(): ...
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field, field_validator

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.spec import load_spec
from dfm_prefect.transports import transport_class, transport_names


class Federation(Block):
    """A federation of sites, reached over any installed transport.

    The block holds the transport's spec in self-contained form (for FLARE the
    admin startup kit's files, for the local transport the sites' addresses and
    the shared key), all of it a secret: never shown in the UI, in logs or in
    reports.
    """

    _block_type_name = "dfm-prefect Federation"
    _block_type_slug = "dfm-federation"
    _description = "How flows reach a dfm-prefect federation: its transport and spec (a secret)."
    _documentation_url = "https://github.com/dfm-prefect/dfm-prefect#prefect"  # type: ignore[assignment]

    transport: str = Field(default="flare", description="How the client reaches the sites (an installed transport).")
    spec: SecretDict = Field(description="The transport's federation spec, self-contained (for FLARE: the admin kit's files).")

    @field_validator("transport")
    @classmethod
    def _installed(cls, value: str) -> str:
        if value not in transport_names():
            raise ValueError(f"unknown transport {value!r}; installed transports: {transport_names()}")
        return value

    def federation_spec(self) -> Any:
        """The transport spec this block describes (FLARE: the admin kit is written to a private folder)."""
        data: dict[str, Any] = dict(self.spec.get_secret_value())
        return transport_class(self.transport).spec_from_portable({**data, "transport": self.transport})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Federation:
        """Build the block from a federation file (FLARE: reads the admin kit it points to)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read federation file {path}: {exc}") from None
        spec = load_spec(data)
        name = data["transport"]
        return cls(transport=name, spec=transport_class(name).portable_spec(spec))
