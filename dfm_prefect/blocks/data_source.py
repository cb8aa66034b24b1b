"""The `DataSource` block: a named pointer to a dataset held by a site (no credentials)."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field


class DataSource(Block):
    """A dataset a site publishes, for flow parameters that should not hard-code site names.

    Credentials stay with the site (in its own config and environment); this block
    only says where the data is, so placement can send work there.

    Example:

    ```python
    temperature = DataSource.load("north-temperature")
    subset.submit(data=temperature.ref, ranges={"time": {"start": "2001", "stop": "2002"}})
    ```
    """

    _block_type_name = "dfm-prefect Data Source"
    _block_type_slug = "dfm-data-source"
    _description = "A dataset held by a dfm-prefect site, named as dfm://site/source."

    site: str = Field(description="The site that holds the data.")
    source: str = Field(description="The source name in that site's catalog.")
    description: str = Field(default="", description="What the data is.")

    @property
    def ref(self) -> str:
        """The data name operations accept: ``dfm://<site>/<source>``."""
        return f"dfm://{self.site}/{self.source}"
