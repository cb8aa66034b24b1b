"""A benchmark environment: a local Prefect API and a two-site federation on 127.0.0.1."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

from dfm_prefect.testing.prefect_server import LocalPrefectServer
from dfm_prefect.transports.flare.deploy.launcher import FlareFederation
from dfm_prefect.transports.local.launcher import LocalFederation

SITES = ("north", "south")


def write_site_configs(root: Path, *, concurrency: int = 4, sources: dict[str, list[dict]] | None = None) -> list[Path]:
    paths = []
    for name in SITES:
        config = {
            "name": name,
            "operations": ["core.echo", "core.sleep", "xarray.subset", "xarray.moments", "xarray.reduce"],
            "sources": (sources or {}).get(name, []),
            "result_store": {"url": f"file://{root / 'store' / name}"},
            "export": {"kinds": ["aggregate", "value"], "max_bytes": 1 << 20, "inline_bytes": 256 << 10},
            "limits": {"concurrency": concurrency},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


class BenchEnv:
    """Holds the Prefect server and the local federation for the benchmarks of one run."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.root = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="dfm-bench-")))
        self.federation: LocalFederation | None = None
        self.flare: FlareFederation | None = None
        self.peer_expected: float | None = None

    def __enter__(self) -> BenchEnv:
        self._stack.enter_context(LocalPrefectServer(self.root / "prefect"))
        return self

    def site_sources(self) -> dict[str, list[dict]]:
        """Data every benchmark federation offers: the small grid of the DFM head-to-head, on north."""
        from bench.peer_dfm import make_grid

        grid = self.root / "peer" / "grid.nc"
        if not grid.exists():
            self.peer_expected = make_grid(grid)
        return {"north": [{"name": "peer-grid", "url": f"file://{grid}"}]}

    def local_federation(self) -> LocalFederation:
        if self.federation is None:
            configs = write_site_configs(self.root, sources=self.site_sources())
            self.federation = self._stack.enter_context(LocalFederation(configs, workdir=self.root / "federation"))
        return self.federation

    def flare_federation(self) -> FlareFederation:
        """The same two sites behind a FLARE POC on 127.0.0.1 (mesh job started once, shared by benchmarks)."""
        if self.flare is None:
            root = self.root / "flare"
            root.mkdir(exist_ok=True)
            configs = write_site_configs(root, sources=self.site_sources())
            self.flare = self._stack.enter_context(FlareFederation(configs, workdir=root / "federation"))
        return self.flare

    def __exit__(self, *exc: object) -> None:
        from dfm_prefect.client import close_clients

        close_clients()
        self._stack.close()
