"""The contract shared by the client, the federation server and the sites.

Wire messages (``wire``), errors (``errors``), references (``refs``), value
codecs (``codecs``), frame batching (``framing``) and the operation registry with
the `OperationContext` protocol (``operations``). This package imports nothing
else of dfm-prefect and never Prefect (checked by import-linter), so every party
can load it.
"""
