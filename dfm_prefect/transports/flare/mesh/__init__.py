"""The NVIDIA FLARE mesh job: the controller that runs on the FLARE server and the executor on every site.

Server side: ``controller`` (the FLARE shell), ``router``, ``sites`` and ``mailbox``.
Site side: ``executor`` and ``replies``. Both: ``senders`` (the authenticated
sender of each aux message) and ``aux``. Both are referenced by class path from
the job's JSON config; participants allow them with
``dfm_prefect.transports.flare.mesh.`` in their ``class_allow_list`` (see
docs/flare.md), and nothing else of dfm-prefect lives in this package.
"""
