"""Helpers for tests, benchmarks and the demo: a Prefect API server, a moto S3 server, synthetic climate data.

Nothing in the library imports this package except the demo command
(``dfm_prefect.demo``), which is itself a harness around the example flow.
"""
