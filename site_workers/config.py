"""The site config file: what a site offers, where its data is, what may leave it.

A site administrator writes one YAML file per site; :func:`load_site_config`
validates it (unknown keys are errors) and resolves ``${env:NAME}`` references
from the site's own environment, so credentials never sit in the file.

Example (``north.yaml``):

```yaml
name: north
operations: [core.echo, xarray.subset, xarray.moments]
sources:
  - name: temperature
    url: file:///srv/data/north/temperature.zarr
  - name: temperature-s3
    url: s3://climate/north/temperature.zarr
    storage_options:
      endpoint_url: ${env:S3_ENDPOINT}
      key: ${env:AWS_ACCESS_KEY_ID}
      secret: ${env:AWS_SECRET_ACCESS_KEY}
result_store:
  url: file:///srv/dfm/north/results
export:
  kinds: [aggregate, value]
  max_bytes: 10000000
limits:
  concurrency: 4
```
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.core.refs import ResultKind
from site_workers.adapter_config import DatabaseConfig, ProgramConfig, ServiceConfig
from site_workers.compute_config import ComputeConfig
from site_workers.retention_config import RetentionPolicy

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _no_password_in_url(url: str) -> str:
    # Source URLs are published in the catalog: a password in one would leave the site.
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        raise ValueError(
            "a URL must not carry a password (user:password@host); put credentials in "
            "storage_options, read from the site's environment with ${env:NAME}"
        )
    return url


class SourceConfig(_Model):
    """A dataset the site publishes, by fsspec URL: a local path, ``s3://`` (any endpoint),
    ``memory://`` or any other protocol fsspec has registered.

    ``format`` is inferred from the extension (.zarr, .nc, .parquet, .csv) unless
    given. ``storage_options`` go to the fsspec filesystem; take credentials from
    the site's environment with ``${env:NAME}``. A ``memory://`` source lives in the
    site process only, so it needs ``compute: threads`` (worker processes of the
    other kinds cannot see it).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    url: str = Field(min_length=1)
    format: Literal["zarr", "netcdf", "parquet", "csv"] | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    description: str = ""
    views: bool = Field(
        default=True,
        description="Gridded intermediates of this source (a subset, a derived variable) stay views: the site keeps "
        "their recipe and a fingerprint of the source (file sizes and modification stamps, or S3 ETags) and "
        "recomputes them where they are used, refusing with source_changed once the source changed. false: store a "
        "copy of each (for a source that changes often, or whose changes its metadata would not show).",
    )

    _url = field_validator("url")(_no_password_in_url)


class RootConfig(_Model):
    """A location under which operations may read any path (besides declared sources)."""

    url: str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    views: bool = Field(default=True, description="As for a source: intermediates of data under this root stay views.")

    _url = field_validator("url")(_no_password_in_url)


class StoreConfig(_Model):
    """Where results are written (any fsspec URL the site can write to), and how long they stay (``retention``)."""

    url: str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    retention: RetentionPolicy = RetentionPolicy()

    _url = field_validator("url")(_no_password_in_url)


class DisclosurePolicy(_Model):
    """Minimum counts below which results say too much about single records (DataSHIELD's disclosure traps).

    ``min_group_size`` (DataSHIELD's ``nfilter.tab``): every non-empty group of
    an ``aggregate`` that leaves the site (by value or fetch) was counted, at the
    site, from at least this many records or cells; an aggregate with a smaller
    group, or one whose operation reports no counts, stays at the site.
    ``min_subset_size`` (``nfilter.subset``): a filter or subset must keep at
    least this many records or cells of its input, and leave out none or at
    least this many (differencing two queries that differ by fewer would isolate
    them). ``1`` switches a rule off. Both count cells for gridded data and rows
    for tables.

    Example::

        export:
          kinds: [aggregate]
          disclosure: {min_group_size: 5, min_subset_size: 10}
    """

    min_group_size: int = Field(default=3, ge=1, le=1_000_000)
    min_subset_size: int = Field(default=3, ge=1, le=1_000_000)


class SiteRule(_Model):
    """What may move between this site and one other site, per result: its kinds and at most how many bytes."""

    kinds: list[ResultKind] = Field(min_length=1)
    max_bytes: int = Field(default=1 << 30, ge=0)


_SITE_KEY = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class ImportPolicy(_Model):
    """What this site accepts from other sites (moves it pulls for a flow).

    ``sites`` names each site it takes results from, with the kinds and the
    largest result; ``quota_bytes`` caps the bytes of moved-in results its store
    holds at once. A move from a site not listed, of another kind, larger than
    the rule or over the quota is refused before any byte is sent.

    Example::

        imports:
          sites: {north: {kinds: [dataset], max_bytes: 2000000000}}
          quota_bytes: 20000000000
    """

    sites: dict[_SITE_KEY, SiteRule] = Field(default_factory=dict)
    quota_bytes: int = Field(default=10 << 30, ge=0)


class ExportPolicy(_Model):
    """What may leave the site.

    ``kinds`` lists the result kinds that may be sent to a client at all;
    ``max_bytes`` caps the size of any one result that leaves; results up to
    ``inline_bytes`` (and allowed) come back together with their reference.
    ``disclosure`` sets the minimum counts of `DisclosurePolicy`. The summary in
    a reference shows only names and dtypes unless the result itself could leave
    for that client.

    ``recipients`` narrows a kind to named clients: a result of a kind listed
    there leaves only for a client whose identity the transport authenticated
    and that is on the list (the local transport authenticates no individual
    clients, so such kinds never leave through it). ``error_detail`` decides
    what an unexpected operation failure says: ``type`` (the default) sends its
    exception type and an incident id, and keeps the message, which may quote
    data, in the site's log; ``message`` also sends the message (for sites
    without sensitive data).

    Example::

        export:
          kinds: [aggregate, value, dataset]
          recipients: {dataset: [alice@lab.example]}   # raw grids only to alice
          disclosure: {min_group_size: 5}
    """

    kinds: list[ResultKind] = Field(default_factory=lambda: ["aggregate", "value"])
    max_bytes: int = Field(default=10 << 20, ge=0)
    inline_bytes: int = Field(default=1 << 20, ge=0)
    share_logs: bool = True
    recipients: dict[ResultKind, list[Annotated[str, Field(min_length=1, max_length=256)]]] = Field(
        default_factory=dict, description="Per result kind, the only client identities it may leave for."
    )
    error_detail: Literal["message", "type"] = "type"
    disclosure: DisclosurePolicy = DisclosurePolicy()
    sites: dict[_SITE_KEY, SiteRule] = Field(
        default_factory=dict,
        description="Per other site, what may move there (kinds, bytes per result); apart from what may go to "
        "clients, and only to sites named here. A move also needs the receiving site's `imports`.",
    )

    @model_validator(mode="after")
    def _recipients_name_kinds_that_leave(self) -> ExportPolicy:
        stuck = sorted(set(self.recipients) - set(self.kinds))
        if stuck:
            raise ValueError(f"export.recipients names kinds {stuck} that export.kinds does not let leave at all; add them to kinds or drop them")
        return self


class Limits(_Model):
    """How much work the site takes on."""

    concurrency: int = Field(default=4, ge=1, le=1024)
    queue: int = Field(default=10_000, ge=0, description="Requests that may wait for a slot.")
    max_params_bytes: int = Field(default=1 << 20, ge=1024)
    reply_buffer_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="Replies one client may have waiting unread; beyond it the site stops reading that client's frames.",
    )
    reply_stall_s: float = Field(default=120.0, gt=0, description="A client that reads nothing this long while replies wait is dropped.")
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=600, description="Local transport: time to authenticate.")
    max_unauthenticated: int = Field(default=64, ge=1, le=4096, description="Local transport: connections waiting to authenticate.")


class CachePolicy(_Model):
    """Which operations' results the site keeps and hands out again for the same request (off by default).

    A request for one of ``operations`` with the same parameters and the same
    inputs (each stored input's sha256, each data source's fingerprint now) gets
    the result the site stored the first time, at once, instead of a
    recomputation. The export policy still decides, for whoever asks, what of it
    may leave. Entries are kept in the site process's memory, at most
    ``max_entries`` (least recently used go first); a result the store no longer
    holds is computed again.

    Example::

        cache:
          operations: [xarray.moments, xarray.histogram]
    """

    operations: list[str] = Field(default_factory=list, description="Operations whose results are reused for identical requests.")
    max_entries: int = Field(default=4096, ge=1, le=1_000_000)


USER_CODE_OPERATION = "code.python"
"""The one operation that runs code sent by clients; offered only with ``user_code.enabled``."""


class UserCodePolicy(_Model):
    """Whether the site runs Python source sent by clients (``code.python``), and within what limits.

    Off by default. Turning it on gives every client of the federation the power
    to run programs as the site's OS user (see docs/security.md): the code runs in
    a separate process with no site credentials in its environment and with CPU,
    memory, output and wall-clock limits, but it can read whatever that user can.

    Example::

        operations: [core.echo, code.python]
        user_code: {enabled: true, timeout_s: 30, memory_bytes: 536870912}
    """

    enabled: bool = False
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Wall-clock limit of one run.")
    cpu_s: int = Field(default=60, ge=1, le=3600, description="CPU-seconds limit of one run.")
    memory_bytes: int = Field(default=1 << 30, ge=64 << 20, description="Address-space limit of the process.")
    max_source_bytes: int = Field(default=64 << 10, ge=1, le=16 << 20)
    max_output_bytes: int = Field(default=1 << 20, ge=1024, le=256 << 20, description="Result and printed output, each.")


class IdentityPolicy(_Model):
    """Whose requests the site believes, and whether it serves anonymous ones.

    Requests are signed with the sender's certificate (see
    :mod:`dfm_prefect.core.identity`); the site checks them against ``root_ca``
    (over FLARE the site kit's root CA is used when this is not set). With
    ``require: true`` unsigned requests are refused; otherwise they run as
    anonymous, which ``export.recipients`` never names. ``audit_log`` is the
    file where the site records who ran what on which data and what left.

    Example::

        identities: {require: true, audit_log: /var/log/dfm/north.audit.jsonl}
    """

    root_ca: str | None = Field(default=None, description="PEM root CA whose certificates may sign requests.")
    require: bool = False
    max_age_s: float = Field(default=120.0, gt=0, le=3600, description="How old a signature may be (and clock skew).")
    audit_log: str | None = Field(default=None, description="JSON-lines audit file (default: $DFM_AUDIT_DIR/<site>.audit.jsonl, else the site log).")


class SiteConfig(_Model):
    """A validated site config file."""

    name: str
    operations: list[str] = Field(description="The operations this site offers (its allow-list).")
    operation_modules: list[str] = Field(
        default_factory=list,
        description="Extra installed modules to import operations from (besides entry points).",
    )
    sources: list[SourceConfig] = Field(default_factory=list)
    data_roots: list[RootConfig] = Field(default_factory=list)
    result_store: StoreConfig
    export: ExportPolicy = ExportPolicy()
    limits: Limits = Limits()
    compute: ComputeConfig = ComputeConfig()
    user_code: UserCodePolicy = UserCodePolicy()
    identities: IdentityPolicy = IdentityPolicy()
    imports: ImportPolicy = ImportPolicy()
    cache: CachePolicy = CachePolicy()
    databases: list[DatabaseConfig] = Field(default_factory=list, description="Databases the site reads (site_workers.adapter_config).")
    programs: list[ProgramConfig] = Field(default_factory=list, description="Command-line programs offered as program.<name>.")
    services: list[ServiceConfig] = Field(default_factory=list, description="HTTP services offered as service.<name>.<operation>.")

    _env_secrets: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def env_secrets(self) -> frozenset[str]:
        """Values the config took from the site's environment (outside ``url`` fields): treated as secrets."""
        return self._env_secrets

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError("site names are lowercase letters, digits, '-' and '_' (at most 63)")
        return value

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        names = [source.name for source in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _declared_names_unique(self) -> SiteConfig:
        names = [db.name for db in self.databases]
        queries = [query.name for db in self.databases for query in db.queries]
        programs = [program.name for program in self.programs]
        services = [service.name for service in self.services]
        for what, found in (("database", names), ("named query", queries), ("program", programs), ("service", services)):
            repeated = sorted({name for name in found if found.count(name) > 1})
            if repeated:
                raise ValueError(f"{what} names must be unique at a site; repeated: {repeated}")
        wants_sql = sorted(name for name in self.operations if name in ("sql.select", "sql.aggregate"))
        if wants_sql and not self.databases:
            raise ValueError(f"operations lists {wants_sql}, which read the site's databases, but it declares none (databases:)")
        return self

    @model_validator(mode="after")
    def _user_code_is_opt_in(self) -> SiteConfig:
        if USER_CODE_OPERATION in self.operations and not self.user_code.enabled:
            raise ValueError(
                f"operations lists {USER_CODE_OPERATION}, which runs code sent by clients; opt in with "
                "user_code: {enabled: true} after reading docs/security.md, or remove it"
            )
        return self


def _resolve_env(value: Any, where: str, found: set[str], key: str = "") -> Any:
    """Substitute ``${env:NAME}``; collect the substituted values into ``found`` (except in URLs)."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set at this site")
            if key != "url":  # URLs are published in the catalog; the rest may be credentials
                found.add(os.environ[name])
            return os.environ[name]

        return _ENV_REF.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _resolve_env(item, f"{where}.{k}", found, str(k)) for k, item in value.items()}
    if isinstance(value, list):
        return [_resolve_env(item, f"{where}[{i}]", found, key) for i, item in enumerate(value)]
    return value


def parse_site_config(data: Any, *, origin: str = "site config") -> SiteConfig:
    """Validate an already-parsed config mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    found: set[str] = set()
    try:
        config = SiteConfig.model_validate(_resolve_env(data, "config", found))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{origin} is invalid: {problems}") from None
    config._env_secrets = frozenset(found)
    return config


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read site config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_site_config(data, origin=str(path))
