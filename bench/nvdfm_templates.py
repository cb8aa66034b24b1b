"""Text templates of the NVIDIA DFM benchmark federation: its config, adapters and FLARE project.

Used by `bench/nvdfm_driver.py`, which runs in its own virtual environment
(nv-dfm-core pins an older nvflare than dfm-prefect).
"""

FED_PKG = "dfmbench"
USER = "admin@nvidia.com"

FEDERATION_YAML = f"""\
dfm: 1.0.0
info:
  api-version: 0.0.1
  code-package: {FED_PKG}
  description: "DFM benchmark federation: load/subset/mean a gridded dataset"
operations:
  data.Load:
    description: "Load a gridded dataset from a local netCDF file"
    parameters:
      path: {{type: string, description: "path of the netCDF file on the site"}}
    required: [path]
    returns: object
  data.Subset:
    description: "lat/lon box subset of a dataset"
    parameters:
      data: {{type: object, description: "xarray Dataset"}}
      lat_min: {{type: number, description: "min latitude"}}
      lat_max: {{type: number, description: "max latitude"}}
      lon_min: {{type: number, description: "min longitude"}}
      lon_max: {{type: number, description: "max longitude"}}
    required: [data, lat_min, lat_max, lon_min, lon_max]
    returns: object
  data.Mean:
    description: "Mean of one variable over all dims"
    parameters:
      data: {{type: object, description: "xarray Dataset"}}
      variable: {{type: string, description: "variable name"}}
    required: [data, variable]
    returns: number
sites:
  homesite:
    info: {{description: "client application (the benchmark process)"}}
    interface: {{}}
  server:
    info: {{description: "NVFlare server / DFM controller; no operations (required for FLARE)"}}
    interface: {{}}
  datasite:
    info: {{description: "worker site holding the data"}}
    interface:
      "#/operations/data.Load":
        adapter: {FED_PKG}.lib.Load
        args:
          path: {{from-param: path}}
      "#/operations/data.Subset":
        adapter: {FED_PKG}.lib.Subset
        args:
          data: {{from-param: data}}
          lat_min: {{from-param: lat_min}}
          lat_max: {{from-param: lat_max}}
          lon_min: {{from-param: lon_min}}
          lon_max: {{from-param: lon_max}}
      "#/operations/data.Mean":
        adapter: {FED_PKG}.lib.Mean
        args:
          data: {{from-param: data}}
          variable: {{from-param: variable}}
"""

HUBSITE_YAML = f"""\
  hubsite:
    info: {{description: "worker site with no data: takes the mean of what another site sends it"}}
    interface:
      "#/operations/data.Mean":
        adapter: {FED_PKG}.lib.Mean
        args:
          data: {{from-param: data}}
          variable: {{from-param: variable}}
"""
"""The second worker site of the two-site pipeline (appended to FEDERATION_YAML)."""

CLIENT_YAML = """\
  - name: {site}
    type: client
    org: bench
"""

ADAPTERS_PY = '''\
"""Minimal DFM adapters. DFM instantiates each class once per site (passing
site/provider if the constructor accepts them) and awaits body(**args)."""
import xarray as xr


class Load:
    def __init__(self, site=None, provider=None):
        self._site = site

    async def body(self, path: str):
        with xr.open_dataset(path, engine="scipy") as ds:
            return ds.load()


class Subset:
    def __init__(self, site=None, provider=None):
        self._site = site

    async def body(self, data, lat_min, lat_max, lon_min, lon_max):
        return data.sel(lat=slice(lat_min, lat_max), lon=slice(lon_min, lon_max))


class Mean:
    def __init__(self, site=None, provider=None):
        self._site = site

    async def body(self, data, variable: str):
        return float(data[variable].mean())
'''

PROJECT_YAML = """\
api_version: 3
name: {name}
description: DFM benchmark POC
participants:
  - name: {user}
    type: admin
    org: bench
    role: project_admin
  - name: server
    type: server
    org: bench
    fed_learn_port: {fl_port}
    admin_port: {admin_port}
{clients}builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args:
      template_file: [master_template.yml, aws_template.yml, azure_template.yml]
  - path: nvflare.lighter.impl.template.TemplateBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
      overseer_agent:
        path: nvflare.ha.dummy_overseer_agent.DummyOverseerAgent
        overseer_exists: false
        args:
          sp_end_point: localhost:{fl_port}:{admin_port}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
  - path: nv_dfm_core.targets.flare.builder.WorkspaceArchiveBuilder
"""
