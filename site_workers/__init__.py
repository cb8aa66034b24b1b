"""The site runtime: what runs next to the data, with no transport code.

Config (``config``), sources and path confinement (``sources``, ``confine``),
readers, compute backends, the result store, the export policy, redaction,
identities and the audit log, and the worker that answers requests
(``worker.SiteWorker``). A transport's site endpoint hosts a ``SiteWorker``.
"""
