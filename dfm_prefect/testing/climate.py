"""Synthetic but realistic gridded temperature: climatology, seasons, a trend and weather noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClimateSpec:
    """Size of the synthetic field: daily steps over ``years`` on a ``resolution``-degree grid."""

    years: int = 4
    resolution: float = 1.0
    start_year: int = 2000
    seed: int = 42
    chunk_days: int = 92

    @property
    def raw_bytes(self) -> int:
        days = (np.datetime64(f"{self.start_year + self.years}-01-01", "D") - np.datetime64(f"{self.start_year}-01-01", "D")).astype(int)
        return days * int(180 / self.resolution) * int(360 / self.resolution) * 4


def make_region(spec: ClimateSpec, lat_min: float, lat_max: float):
    """The temperature field (K, float32) for latitudes in [lat_min, lat_max)."""
    import pandas as pd
    import xarray as xr

    step = spec.resolution
    lats = np.arange(-90 + step / 2, 90, step)
    lats = lats[(lats >= lat_min) & (lats < lat_max)]
    lons = np.arange(step / 2, 360, step)
    time = pd.date_range(f"{spec.start_year}-01-01", f"{spec.start_year + spec.years - 1}-12-31", freq="D")
    rng = np.random.default_rng([spec.seed, int(lat_min + 90)])
    phi = np.deg2rad(lats)[None, :, None]
    lam = np.deg2rad(lons)[None, None, :]
    day = (time.day_of_year.values - 1)[:, None, None]
    years = (time.year.values - spec.start_year)[:, None, None] + day / 365.25
    climatology = 302.0 - 45.0 * np.sin(phi) ** 2 + 3.0 * np.cos(2 * lam) * np.cos(phi)
    season = -12.0 * np.sin(phi) * np.cos(2 * np.pi * (day - 15) / 365.25)
    trend = 0.025 * years
    field = np.empty((len(time), len(lats), len(lons)), dtype=np.float32)
    for start in range(0, len(time), spec.chunk_days):
        block = slice(start, start + spec.chunk_days)
        noise = rng.normal(0.0, 2.5, size=(len(time[block]), len(lats), len(lons)))
        field[block] = climatology + season[block] + trend[block] + noise
    ds = xr.Dataset(
        {"temperature": (("time", "lat", "lon"), field, {"units": "K", "long_name": "near-surface air temperature"})},
        coords={
            "time": time,
            "lat": ("lat", lats, {"units": "degrees_north"}),
            "lon": ("lon", lons, {"units": "degrees_east"}),
        },
        attrs={"title": "dfm-prefect synthetic climate", "seed": spec.seed},
    )
    return ds.chunk({"time": spec.chunk_days, "lat": -1, "lon": -1})


def write_zarr(ds, store) -> None:
    """Write a dataset as consolidated zarr (v2 layout, readable by any zarr)."""
    ds.to_zarr(store, mode="w", zarr_format=2, consolidated=True)
