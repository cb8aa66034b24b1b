"""The ``compute`` section of a site config: where operations' Dask work runs, and how it is secured."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchedulerTLS(_Model):
    """The site's client certificate for an existing scheduler that speaks mutual TLS (``tls://``).

    PEM files at the site: the CA that signed the scheduler's and workers'
    certificates, the certificate the site presents, and its key (mode 0600).
    """

    ca_file: str = Field(min_length=1)
    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)


class ComputeConfig(_Model):
    """Where the Dask work of operations runs.

    ``threads``: Dask's threaded scheduler in the site process (no memory limit).
    ``cpu``: a `distributed.LocalCluster` of ``workers`` worker processes, each
    held to ``memory_limit`` by its nanny. ``gpu``: a `dask_cuda.LocalCUDACluster`
    (one worker per GPU, at most ``workers``) with CuPy chunks; needs the ``gpu``
    extra. ``auto``: ``gpu`` when a GPU and dask-cuda are there, else ``cpu`` (and
    the site log says why). Every cluster the site starts speaks only mutual TLS,
    with certificates made for it at start (see docs/security.md).

    With ``scheduler_address`` the site starts no cluster and sends its work to
    that scheduler; ``kind`` then says whether its workers get NumPy (``cpu``) or
    CuPy (``gpu``) chunks. Whoever can talk to that scheduler runs code as the
    site, so a ``tls://`` address needs ``scheduler_tls`` (the site's certificate
    for it), and a ``tcp://`` or ``ucx://`` one is refused unless the admin sets
    ``allow_unauthenticated_scheduler: true``, which the site log repeats as a
    warning at every start.

    Example::

        compute: {kind: cpu, workers: 2, threads_per_worker: 2, memory_limit: 2GiB}
        compute:
          kind: cpu
          scheduler_address: tls://dask.lab.internal:8786
          scheduler_tls: {ca_file: /etc/dfm/dask-ca.pem, cert_file: /etc/dfm/site.pem, key_file: /etc/dfm/site-key.pem}
    """

    kind: str = Field(default="threads", pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="threads, cpu, gpu, auto or a registered backend.")
    workers: int | None = Field(default=None, ge=1, le=1024)
    threads_per_worker: int | None = Field(default=None, ge=1, le=1024)
    memory_limit: str | None = Field(
        default=None,
        pattern=r"^(auto|0?\.\d+|\d+(\.\d+)?\s*([kKMGT]i?B|B)?)$",
        description="Per worker process: bytes ('512MiB', '2GB'), a fraction of RAM ('0.25') or 'auto'.",
    )
    scheduler_address: str | None = Field(default=None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$")
    scheduler_tls: SchedulerTLS | None = None
    allow_unauthenticated_scheduler: bool = Field(
        default=False, description="Let the site use a scheduler anyone who reaches it can run code on (tcp://, ucx://)."
    )

    @model_validator(mode="after")
    def _scheduler_needs_array_kind(self) -> ComputeConfig:
        if self.scheduler_address is not None and self.kind not in ("cpu", "gpu"):
            raise ValueError(
                "compute.scheduler_address needs kind: cpu (its workers get NumPy chunks) "
                "or kind: gpu (dask-cuda workers, CuPy chunks)"
            )
        return self

    @model_validator(mode="after")
    def _scheduler_needs_authentication(self) -> ComputeConfig:
        address = self.scheduler_address
        if address is None:
            if self.scheduler_tls is not None or self.allow_unauthenticated_scheduler:
                raise ValueError(
                    "compute.scheduler_tls and allow_unauthenticated_scheduler apply only with scheduler_address; "
                    "the clusters a site starts itself always use their own TLS certificates"
                )
            return self
        scheme = address.split("://", 1)[0]
        if scheme == "tls" and self.scheduler_tls is None:
            raise ValueError(
                f"compute.scheduler_address {address} speaks TLS: give the site's certificate for it with "
                "scheduler_tls: {ca_file: ..., cert_file: ..., key_file: ...}"
            )
        if scheme in ("tcp", "ucx") and self.scheduler_tls is not None:
            raise ValueError(f"compute.scheduler_tls needs a tls:// scheduler_address, not {address}")
        if scheme in ("tcp", "ucx") and not self.allow_unauthenticated_scheduler:
            raise ValueError(
                f"compute.scheduler_address {address} has no authentication: any process that reaches it runs code "
                "as this site (Dask runs pickled functions). Start the scheduler with TLS (dask scheduler --tls-ca-file "
                "--tls-cert --tls-key) and give a tls:// address with scheduler_tls, or, only if nothing else can reach "
                "it, set allow_unauthenticated_scheduler: true (see docs/security.md)"
            )
        return self
