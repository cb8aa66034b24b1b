"""The ``dfm-prefect`` command line.

Exit codes: 0 success, 1 the command ran but its check failed (for example the
demo's numbers disagree), 2 bad input (config, arguments), 3 a site or the
federation is unreachable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dfm_prefect.core.errors import ConfigError, FederationError, SiteUnavailableError

app = typer.Typer(help="dfm-prefect: run Prefect flows where the data lives.", no_args_is_help=True)
site_app = typer.Typer(help="Run or check one site.", no_args_is_help=True)
federation_app = typer.Typer(help="Start, stop and inspect a federation.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(federation_app, name="federation")
prefect_app = typer.Typer(help="Prepare a Prefect server for dfm-prefect deployments.", no_args_is_help=True)
app.add_typer(prefect_app, name="prefect")
console = Console()
err = Console(stderr=True)

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3



def _transport(value: str) -> str:
    from dfm_prefect.transports import transport_names

    if value not in transport_names():
        raise typer.BadParameter(f"unknown transport {value!r}; installed: {', '.join(transport_names())}")
    return value


TRANSPORT_HELP = "An installed transport: flare (sites behind FLARE, mTLS, one mesh job) or local (plain site processes), or any other registered."


FEDERATION_HELP = "Federation file or block:NAME (default: $DFM_FEDERATION)."


def _client(federation: Optional[Path]) -> Any:
    """The client for ``--federation`` or ``$DFM_FEDERATION``: a federation file or ``block:NAME``, as flows accept."""
    from dfm_prefect.client import get_client
    from dfm_prefect.spec import FEDERATION_ENV

    source = str(federation) if federation is not None else os.environ.get(FEDERATION_ENV)
    if source is not None and source.startswith("block:"):
        from dfm_prefect.task_runner import resolve_federation

        try:
            return get_client(resolve_federation(source))
        except ValueError as exc:  # Prefect's message when no such block exists
            raise ConfigError(
                f"cannot load Federation block {source[len('block:'):]!r} from the Prefect API: {exc}; "
                "create it with `dfm-prefect prefect setup --federation FILE --block NAME` (and check PREFECT_API_URL)"
            ) from None
    return get_client(source)


@contextlib.contextmanager
def _progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the elapsed time; each finished stage is printed once, above it, with its time."""
    started = time.monotonic()
    with console.status(f"{title}...") as status:

        def step(line: str) -> None:
            elapsed = time.monotonic() - started
            console.print(f"[green]✓[/green] {escape(line)} [dim]({elapsed:.1f} s)[/dim]")
            status.update(f"{title}... ({escape(line)})")

        yield step


def _fail(exc: FederationError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    if isinstance(exc, ConfigError):
        return typer.Exit(EXIT_BAD_INPUT)
    if isinstance(exc, SiteUnavailableError):
        return typer.Exit(EXIT_UNREACHABLE)
    return typer.Exit(EXIT_CHECK_FAILED)


# ------------------------------------------------------------------------ demo


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where data, site configs and results go.")] = Path(".demo"),
    years: Annotated[int, typer.Option(min=1, max=50)] = 4,
    resolution: Annotated[float, typer.Option(min=0.25, max=10.0, help="Grid spacing in degrees.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    transport: Annotated[str, typer.Option(help=TRANSPORT_HELP, callback=_transport)] = "flare",
) -> None:
    """Run the federated climate demo on two sites (one on S3) over FLARE and check the answer."""
    from dfm_prefect.demo import RTOL, ClimateSpec, run_demo

    # Without PREFECT_API_URL, Prefect starts a local server process for the run; it
    # reads this from its environment and would otherwise try to send telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    spec = ClimateSpec(years=years, resolution=resolution)
    try:
        if as_json:
            report = run_demo(workdir, spec, transport=transport, log=lambda _msg: None)
        else:
            with _progress(f"federated demo over {transport}") as step:
                report = run_demo(workdir, spec, transport=transport, log=step)
    except FederationError as exc:
        raise _fail(exc) from None
    if as_json:
        print(report.to_json())
        raise typer.Exit(0 if report.ok else EXIT_CHECK_FAILED)

    answer = Table(title="Global area-weighted near-surface temperature (federated)")
    for column in ("year", "mean [K]", "std [K]", "values", "direct mean [K]"):
        answer.add_column(column, justify="right")
    for year, row in sorted(report.answer.items()):
        answer.add_row(str(year), f"{row['mean']:.6f}", f"{row['std']:.6f}", f"{row['n']:,}", f"{report.direct[year]['mean']:.6f}")
    console.print(answer)

    steps = Table(title="Where each step ran")
    for column in ("task run", "site", "state", "seconds"):
        steps.add_column(column)
    for step in report.steps:
        steps.add_row(step.name, step.site, step.state, f"{step.seconds:.2f}")
    console.print(steps)

    moved = Table(title="Bytes that left each site")
    for column in ("site", "raw data", "left the site", "share"):
        moved.add_column(column, justify="right")
    for site in sorted(report.raw_bytes):
        raw, out = report.raw_bytes[site], report.bytes_out.get(site, 0)
        moved.add_row(site, f"{raw:,}", f"{out:,}", f"{out / raw:.2e}" if raw else "-")
    console.print(moved)
    for site, kinds in sorted(report.stored.items()):
        written = ", ".join(f"{n:,} bytes of {kind}" for kind, n in kinds.items()) or "nothing"
        console.print(f"{site}'s result store: {written} written by this run (intermediates stay views)")
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
    if report.picture:
        console.print(f"picture of the federated answer: {report.picture}")
    if report.ok:
        console.print(f"[green]OK[/green]: the federated answer equals direct computation on the pooled data (max relative difference {report.max_rel_diff:.1e} <= {RTOL:.0e})")
    else:
        err.print(f"[red]MISMATCH[/red]: federated and direct answers differ (max relative difference {report.max_rel_diff:.3e})")
        raise typer.Exit(EXIT_CHECK_FAILED)


# ------------------------------------------------------------------------ site


@site_app.command("check")
def site_check(config: Path) -> None:
    """Validate a site config, open every source (metadata only) and show what the site would offer.

    Exits 2 if the config is invalid or a source is missing, unreadable or not in its format.
    """
    code = 1
    try:
        _site_check(config)
        code = 0
    except typer.Exit as done:
        code = done.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
    finally:
        # Reading Parquet footers leaves Arrow's native reader threads behind; torn down at
        # interpreter exit they can abort the process after the check is done. Nothing is
        # left to clean up here (the site worker was closed), so leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _site_check(config: Path) -> None:
    import logging

    from site_workers.config import load_site_config
    from site_workers.redaction import Redactor
    from site_workers.source_check import check_sources
    from site_workers.worker import SiteWorker

    try:
        site_config = load_site_config(config)
    except FederationError as exc:
        raise _fail(exc) from None
    with console.status(f"opening the {len(site_config.sources)} source(s) of site {site_config.name} (metadata only)..."):
        problems = check_sources(site_config, Redactor.for_config(site_config).text)
    if problems:
        for problem in problems:
            err.print(f"[red]error:[/red] {problem}", soft_wrap=True)
        err.print(f"site {site_config.name}: {len(problems)} of {len(site_config.sources)} source(s) cannot be served; nothing was started")
        raise typer.Exit(EXIT_BAD_INPUT)
    # The catalog below opens the sources again; they were just checked, so its own warnings would repeat them.
    logging.getLogger("dfm_prefect.site.catalog").setLevel(logging.ERROR)
    worker = None
    try:
        worker = SiteWorker(site_config)
        info = worker.describe()
    except FederationError as exc:
        raise _fail(exc) from None
    finally:
        if worker is not None:
            worker.close()
    console.print(f"site [bold]{info.name}[/bold]: config is valid and every source opens")
    _print_site(info)
    if site_config.cache.operations:
        console.print(f"result cache: {', '.join(site_config.cache.operations)} (at most {site_config.cache.max_entries} answers)")
    limits = site_config.result_store.retention.model_dump(exclude_none=True)
    if set(limits) - {"min_age_s"}:
        console.print("result store retention: " + ", ".join(f"{key} {value:,}" for key, value in limits.items()))


@site_app.command("gc")
def site_gc(
    config: Path,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
) -> None:
    """Remove the results the site's retention limits (result_store.retention) let go, oldest first; print what went.

    Safe while the site runs: its processes and this command share the store's lock.
    """
    from site_workers.config import load_site_config
    from site_workers.store import ResultStore

    try:
        site_config = load_site_config(config)
        store = ResultStore(site_config.name, site_config.result_store)
        if store.retention is None:
            raise ConfigError(f"site {site_config.name!r}: its result store {site_config.result_store.url} is not on local disk; it keeps no ledger to collect by")
        report = store.retention.collect(dry_run=dry_run)
    except FederationError as exc:
        raise _fail(exc) from None
    now, verb = store.retention.clock(), "would remove" if dry_run else "removed"
    for removal in report.removed:
        console.print(f"{verb} {removal.name} ({removal.size:,} bytes, stored by {removal.owner}, {now - removal.at:.0f} s old): result_store.retention.{removal.why}", soft_wrap=True)
    policy = site_config.result_store.retention
    console.print(
        f"site {site_config.name}: {verb} {len(report.removed)} result(s), {sum(r.size for r in report.removed):,} bytes; "
        f"the store {'would hold' if dry_run else 'holds'} {report.usage.results} result(s), {report.usage.bytes:,} bytes "
        f"(limit {_bound(policy.max_bytes)})",
        soft_wrap=True,
    )
    for owner, held in sorted(report.usage.per_client.items()):
        console.print(f"  {owner}: {held:,} bytes (limit {_bound(policy.max_bytes_per_client)})")


def _bound(limit: float | None, unit: str = " bytes") -> str:
    return "unbounded" if limit is None else f"{limit:,g}{unit}" if isinstance(limit, float) else f"{limit:,}{unit}"


@site_app.command("start")
def site_start(
    config: Path,
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1 (0: any free port).")] = 0,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """Serve one site over the local transport (needs DFM_AUTHKEY)."""
    from dfm_prefect.transports.local.server import main as serve

    raise typer.Exit(serve([str(config), "--port", str(port), "--host", host]))


# ------------------------------------------------------------------ federation


@federation_app.command("up")
def federation_up(
    configs: Annotated[list[Path], typer.Argument(help="Site config YAML files, one per site.")],
    workdir: Annotated[Path, typer.Option(help="Where the federation file, kits and logs go.")] = Path(".dfm"),
    transport: Annotated[str, typer.Option(help=TRANSPORT_HELP, callback=_transport)] = "flare",
) -> None:
    """Start a federation of the given sites on this machine and write WORKDIR/federation.json."""
    from dfm_prefect.federation_control import up

    try:
        with _progress(f"starting the {transport} federation of {len(configs)} site(s)") as step:
            started = up(configs, workdir, transport=transport, progress=step)
    except FederationError as exc:
        raise _fail(exc) from None
    console.print(f"federation is up over {transport}: {', '.join(started.sites)}")
    console.print(f"use it with: export DFM_FEDERATION={started.federation_file}")


@federation_app.command("down")
def federation_down(workdir: Annotated[Path, typer.Option()] = Path(".dfm")) -> None:
    """Stop every process that `federation up` started from WORKDIR."""
    from dfm_prefect.federation_control import down

    try:
        for line in down(workdir):
            console.print(line)
    except FederationError as exc:
        raise _fail(exc) from None


@federation_app.command("issue")
def federation_issue(
    identity: Annotated[str, typer.Argument(help="The person's name, as export.recipients will name them (e.g. alice@lab.example).")],
    workdir: Annotated[Path, typer.Option(help="The workdir of `federation up --transport local`.")] = Path(".dfm"),
    out: Annotated[Optional[Path], typer.Option(help="Where to write their federation file (default WORKDIR/<identity>.json).")] = None,
) -> None:
    """Give one more person their own certificate on a local federation, and a federation file that signs as them."""
    from dfm_prefect.federation_control import read_started
    from dfm_prefect.spec import load_spec
    from dfm_prefect.transports.base import write_spec
    from dfm_prefect.transports.local.pki import LocalCA

    try:
        started = read_started(workdir)
        if started.transport != "local":
            raise ConfigError(f"people of a {started.transport} federation get their identity from its provisioning (docs/flare.md), not from this command")
        cert, key = LocalCA.load(Path(started.workdir) / "identities").issue(identity)
        spec = load_spec(started.federation_file).model_copy(update={"cert": str(cert), "key": str(key)})
        target = write_spec(spec, out or Path(started.workdir) / f"{identity}.json")
    except FederationError as exc:
        raise _fail(exc) from None
    console.print(f"{identity}: certificate {cert}; their federation file: {target} (give it to them only; it holds their key's path and the federation key)")


@federation_app.command("status")
def federation_status(
    federation: Annotated[Optional[Path], typer.Option(help=FEDERATION_HELP)] = None,
) -> None:
    """Show each site's state, operations and load (exit 3 if a site is down)."""
    try:
        client = _client(federation)
    except FederationError as exc:
        raise _fail(exc) from None
    transport = client.transport.site_states()
    table = Table(title="Sites")
    for column in ("site", "state", "operations", "running", "queued", "capacity", "transport"):
        table.add_column(column)
    for name, info in sorted(client.sites.items()):
        load = info.load
        table.add_row(name, "[green]ready[/green]", ", ".join(sorted(info.operations)), str(load.running), str(load.queued), str(load.capacity), transport.get(name, ""))
    for name, reason in sorted(client.down.items()):
        table.add_row(name, f"[red]down[/red]: {reason}", "", "", "", "", transport.get(name, ""))
    console.print(table)
    moved = Table(title="Bytes that crossed each site's boundary since it started")
    for column in ("site", "to clients", "to other sites", "from other sites", "stored"):
        moved.add_column(column, justify="right" if column != "site" else "left")
    stores = Table(title="Result stores (retention limits; unbounded where not set)")
    for column in ("site", "bytes", "results", "limit", "per client", "max age"):
        stores.add_column(column, justify="right" if column != "site" else "left")
    for name in sorted(client.sites):
        try:
            stats = client.stats(name)
        except FederationError as exc:
            moved.add_row(name, f"[red]{exc}[/red]", "", "", "")
            continue
        moved.add_row(name, f"{stats.bytes_out:,}", f"{stats.bytes_to_sites:,}", f"{stats.bytes_from_sites:,}", f"{stats.bytes_stored:,}")
        usage = stats.store
        if usage is None:
            stores.add_row(name, "not tracked", "", "", "", "")
        else:
            stores.add_row(name, f"{usage.bytes:,}", f"{usage.results:,}", _bound(usage.max_bytes), _bound(usage.max_bytes_per_client), _bound(usage.max_age_s, " s"))
    console.print(moved)
    console.print(stores)
    if client.down:
        raise typer.Exit(EXIT_UNREACHABLE)


@federation_app.command("join")
def federation_join(
    kit: Annotated[Path, typer.Argument(help="This site's FLARE startup kit (the folder holding startup/ and local/).")],
    config: Annotated[Path, typer.Argument(help="This site's YAML config.")],
    shell_for: Annotated[
        Optional[list[str]],
        typer.Option(help="Opt in: this admin role may run FLARE shell commands (ls, cat, grep) on this site, logs included."),
    ] = None,
) -> None:
    """Run this site in a provisioned FLARE federation: harden the kit's policy, start its FLARE client."""
    from dfm_prefect.transports.flare.deploy.participant import run_site

    try:
        raise typer.Exit(run_site(kit, config, log=console.print, shell_roles=shell_for or ()))
    except FederationError as exc:
        raise _fail(exc) from None


@federation_app.command("mesh")
def federation_mesh(
    admin_kit: Annotated[Path, typer.Option(help="The project admin's startup kit.")],
    username: Annotated[str, typer.Option(help="The admin's name as in its certificate.")],
    sites: Annotated[str, typer.Option(help="Comma-separated site names to wait for.")],
    out: Annotated[Path, typer.Option(help="Federation file to write for flows.")] = Path("federation.json"),
    supervise: Annotated[bool, typer.Option(help="Keep running and replace the mesh job when a site rejoins.")] = True,
) -> None:
    """Start the mesh job on a provisioned FLARE federation and write the federation file."""
    from dfm_prefect.transports.flare.deploy.participant import run_mesh

    try:
        run_mesh(admin_kit, username, [s for s in sites.split(",") if s], out, supervise=supervise, log=console.print)
    except FederationError as exc:
        raise _fail(exc) from None


@app.command()
def catalog(
    site: Annotated[Optional[str], typer.Argument(help="Only this site.")] = None,
    federation: Annotated[Optional[Path], typer.Option(help=FEDERATION_HELP)] = None,
    op: Annotated[Optional[str], typer.Option("--op", help="Only this operation, with the fields of its nested parameters.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The sites' own descriptions, as JSON (parameter schemas included).")] = False,
) -> None:
    """Show every operation with its parameters (name, type, default, description), and each site's sources and policy."""
    from dfm_prefect.catalog_view import print_catalog

    try:
        client = _client(federation)
    except FederationError as exc:
        raise _fail(exc) from None
    sites = {k: v for k, v in client.sites.items() if site in (None, k)}
    if site is not None and not sites:
        err.print(f"no reachable site {site!r}; sites: {sorted(client.sites)}")
        raise typer.Exit(EXIT_UNREACHABLE)
    if as_json:
        print(json.dumps({k: v.model_dump(mode="json") for k, v in sites.items()}, indent=2))
        return
    if not print_catalog(console, sites, op=op):
        offered = sorted({name for info in sites.values() for name in info.operations})
        err.print(f"[red]error:[/red] no site offers operation {op!r}; offered: {', '.join(offered)}", soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)


@prefect_app.command("setup")
def prefect_setup(
    federation: Annotated[Path, typer.Option(help="Federation file to store as a block.")],
    block: Annotated[str, typer.Option(help="Name of the Federation block.")] = "dfm",
    pool: Annotated[str, typer.Option(help="Name of the process work pool to create.")] = "dfm-pool",
) -> None:
    """Register dfm-prefect's blocks, save FEDERATION as a Federation block, create a process work pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    from dfm_prefect.blocks import DataSource, Federation

    try:
        document = Federation.from_file(federation)
    except (OSError, ValueError, FederationError) as exc:
        err.print(f"[red]error:[/red] cannot read federation file {federation}: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    with console.status("registering blocks..."):
        Federation.register_type_and_schema()
        DataSource.register_type_and_schema()
        document.save(block, overwrite=True)
    console.print(f"block types registered; Federation block [bold]{block}[/bold] saved ({document.transport} transport)")
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
            )
            console.print(f"process work pool [bold]{pool}[/bold] created")
        except ObjectAlreadyExists:
            console.print(f"process work pool [bold]{pool}[/bold] already exists")
    console.print(f"next: prefect deploy --all && prefect worker start --pool {pool}")


def _print_site(info: object) -> None:
    from dfm_prefect.catalog_view import print_catalog
    from dfm_prefect.core.wire import SiteInfo

    assert isinstance(info, SiteInfo)
    print_catalog(console, {info.name: info})


def main() -> None:
    """Entry point of the console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
