"""Operations that sites offer, registered through the ``dfm_prefect.core.operations`` entry points.

Importing a module here declares its operations; a site runs only those its
config lists. In flows, import the operation objects and use them like tasks::

    from adapters.xarray_ops import subset, moments

Modules: `adapters.core` (echo, sleep), `adapters.xarray_ops` (open, subset,
reduce, derive, write; re-exports the statistics), `adapters.xarray_stats`
(moments, histogram, weighted_mean, groupby_reduce, resample), `adapters.tables`
(filter, project, groupby_aggregate). Helpers: `adapters.expressions` (the
derived-variable grammar), `adapters.xarray_common`, `adapters.zarr_result`.
"""
