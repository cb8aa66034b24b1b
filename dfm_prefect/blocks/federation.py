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

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr
from prefect.types import SecretDict

from dfm_prefect.errors import ConfigError
from dfm_prefect.federation import load_spec

_KIT_DIRS: dict[str, str] = {}


class Federation(Block):
    """A federation of sites, reached over the local or the NVFLARE transport.

    Local transport: the sites' loopback addresses and the shared key. FLARE
    transport: the admin startup kit (its files, stored as a secret) and the
    admin identity. Secrets are never shown in the UI, in logs or in reports.
    """

    _block_type_name = "dfm-prefect Federation"
    _block_type_slug = "dfm-federation"
    _description = "How flows reach a dfm-prefect federation: transport, sites or FLARE admin kit, runner defaults."
    _documentation_url = "https://github.com/dfm-prefect/dfm-prefect#prefect"  # type: ignore[assignment]

    transport: Literal["local", "flare"] = Field(default="flare", description="How the client reaches the sites.")
    local_sites: dict[str, str] = Field(default_factory=dict, description="local transport: site name -> host:port")
    local_authkey: SecretStr | None = Field(default=None, description="local transport: the federation's shared key")
    flare_admin_kit: SecretDict | None = Field(
        default=None, description="FLARE transport: the admin startup kit's files (relative path -> base64 content)"
    )
    flare_username: str | None = Field(default=None, description="FLARE transport: the admin identity (certificate CN)")
    flare_options: dict[str, Any] = Field(
        default_factory=dict, description="FLARE transport: further spec settings (job id or name, timeouts)"
    )
    max_workers: int = Field(default=64, ge=1, description="Runner default: task runs in flight at once.")

    def federation_spec(self) -> Any:
        """The transport spec this block describes (the admin kit is written to a private folder)."""
        if self.transport == "local":
            if not self.local_sites or self.local_authkey is None:
                raise ConfigError(f"federation block {self._block_document_name!r}: local transport needs local_sites and local_authkey")
            return load_spec({"transport": "local", "sites": self.local_sites, "authkey": self.local_authkey.get_secret_value()})
        if self.flare_admin_kit is None or not self.flare_username:
            raise ConfigError(f"federation block {self._block_document_name!r}: FLARE transport needs flare_admin_kit and flare_username")
        kit = self._materialize_kit()
        return load_spec({"transport": "flare", "admin_kit": kit, "username": self.flare_username, **self.flare_options})

    def _materialize_kit(self) -> str:
        assert self.flare_admin_kit is not None
        files: dict[str, str] = self.flare_admin_kit.get_secret_value()
        key = json.dumps(sorted(files.items()))
        if key in _KIT_DIRS and Path(_KIT_DIRS[key]).exists():
            return _KIT_DIRS[key]
        root = Path(tempfile.mkdtemp(prefix="dfm-admin-kit-"))
        os.chmod(root, 0o700)
        for relative, content in files.items():
            target = (root / relative).resolve()
            if root.resolve() not in target.parents:
                raise ConfigError(f"admin kit entry {relative!r} points outside the kit")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(content))
            os.chmod(target, 0o600)
        _KIT_DIRS[key] = str(root)
        return str(root)

    def task_runner(self) -> Any:
        """A `FederationTaskRunner` for this federation with the block's defaults."""
        from dfm_prefect.task_runner import FederationTaskRunner

        return FederationTaskRunner(self, max_workers=self.max_workers)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Federation:
        """Build the block from a federation file (reads the FLARE admin kit it points to)."""
        data = json.loads(Path(path).read_text())
        spec = load_spec(data)
        if data["transport"] == "local":
            return cls(transport="local", local_sites=dict(data["sites"]), local_authkey=data["authkey"])
        kit = Path(data["admin_kit"])
        files = {
            str(file.relative_to(kit)): base64.b64encode(file.read_bytes()).decode()
            for file in sorted(kit.rglob("*"))
            if file.is_file()
        }
        options = {k: v for k, v in spec.model_dump(mode="json").items() if k not in {"transport", "admin_kit", "username"}}
        return cls(transport="flare", flare_admin_kit=files, flare_username=data["username"], flare_options=options)
