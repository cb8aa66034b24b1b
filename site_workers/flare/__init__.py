"""The NVIDIA FLARE mesh job: the controller that runs on the FLARE server and the executor on every site.

Both are referenced by class path from the job's JSON config; sites allow them
with ``site_workers.flare.`` in their ``class_allow_list`` (see docs/flare.md).
"""
