"""Site health: a round trip to every site, with its load and what it offers.

Run it against a running federation::

    DFM_FEDERATION=.dfm/federation.json python -m flows.site_health
"""

from __future__ import annotations

from prefect import flow

from adapters.core import echo
from dfm_prefect import FederationTaskRunner
from dfm_prefect.client import current_client


@flow(name="site-health", task_runner=FederationTaskRunner(), persist_result=True)
def site_health() -> dict[str, dict[str, object]]:
    """Echo through every healthy site and report its operations and load; list the sites that are down."""
    client = current_client()
    refs = {site: echo.submit(value=site, site=site) for site in client.sites}
    report: dict[str, dict[str, object]] = {}
    for site, future in refs.items():
        info = client.sites[site]
        report[site] = {
            "ok": future.result().fetch() == site,
            "operations": sorted(info.operations),
            "running": info.load.running,
            "capacity": info.load.capacity,
        }
    for site, reason in client.down.items():
        report[site] = {"ok": False, "reason": reason}
    return report


if __name__ == "__main__":
    print(site_health())
