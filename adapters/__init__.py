"""Operations that sites offer, registered through the ``dfm_prefect.operations`` entry points.

Importing a module here declares its operations; a site runs only those its
config lists. In flows, import the operation objects and use them like tasks::

    from adapters.xarray_ops import subset, moments
"""
