"""Prefect blocks for dfm-prefect.

Register them with ``prefect block register -m dfm_prefect.blocks``; the
``prefect.collections`` entry point makes them loadable in any process that has
dfm-prefect installed.
"""

from dfm_prefect.blocks.data_source import DataSource
from dfm_prefect.blocks.federation import Federation

__all__ = ["DataSource", "Federation"]
