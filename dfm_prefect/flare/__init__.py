"""NVIDIA FLARE support on the client and operator side: protocol, admin helpers, POC and supervision.

The transport itself is :mod:`dfm_prefect.transports.flare`; the mesh job's
server and site components are in :mod:`site_workers.flare`.
"""
