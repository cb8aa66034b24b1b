"""Pictures of federated results: PNG bytes drawn with matplotlib, shown in the Prefect UI as markdown.

matplotlib is an optional dependency (the ``demo`` extra); it is imported only
when something is drawn, and its absence is reported with the way to install it.

Example::

    from dfm_prefect.pictures import publish_png, yearly_statistics_png

    png = yearly_statistics_png({2001: {"mean": 287.1, "std": 14.2, "n": 5_000}})
    publish_png(png, title="Global yearly temperature", key="climate-yearly")  # inside a flow or task run
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Mapping
from typing import Any, cast

MAX_PNG_BYTES = 200 << 10
"""Pictures stay small enough to embed in an artifact (the UI loads the whole artifact at once)."""


class MatplotlibMissingError(ImportError):
    """Drawing was asked for but matplotlib is not installed."""


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissingError(
            "drawing a picture needs matplotlib: install it with `pip install 'dfm-prefect[demo]'` (or `pip install matplotlib`)"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def yearly_statistics_png(
    stats: Mapping[int, Mapping[str, float]], *, variable: str = "temperature", unit: str = "K", dpi: int = 100
) -> bytes:
    """Draw pooled yearly statistics (``{year: {"mean", "std", "n"}}``) as a PNG.

    Left: the mean per year with a band of one standard deviation around it.
    Right: how many values each year pooled, as bars.
    """
    if not stats:
        raise ValueError("there are no yearly statistics to draw")
    plt = _pyplot()
    years = sorted(stats)
    mean = [float(stats[year]["mean"]) for year in years]
    std = [float(stats[year]["std"]) for year in years]
    count = [int(stats[year]["n"]) for year in years]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    try:
        left.fill_between(years, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25, label="± 1 std")
        left.plot(years, mean, marker="o", label="mean")
        left.set_title(f"Pooled yearly {variable}")
        left.set_xlabel("year")
        left.set_ylabel(f"{variable} [{unit}]")
        left.set_xticks(years)
        left.legend(loc="best", fontsize="small")
        right.bar([str(year) for year in years], count)
        right.set_title("Values pooled per year")
        right.set_xlabel("year")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """A markdown image that carries the PNG itself (a ``data:`` URI), so it needs no file server."""
    if len(png) > MAX_PNG_BYTES:
        raise ValueError(f"the picture is {len(png):,} bytes; pictures embedded in artifacts must stay under {MAX_PNG_BYTES:,} (draw it with a lower dpi)")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def publish_png(png: bytes, *, title: str, key: str | None = None, text: str = "") -> uuid.UUID:
    """Attach the picture to the running flow or task run as a markdown artifact; return the artifact's id.

    ``key`` (lowercase letters, digits and dashes) groups the pictures of successive
    runs under one name in the UI's Artifacts page.
    """
    from prefect.artifacts import create_markdown_artifact

    markdown = "\n\n".join(part for part in (f"# {title}", markdown_image(png, title), text) if part)
    # Prefect picks the sync or async implementation from the calling context; ask for the sync one explicitly.
    return cast(uuid.UUID, create_markdown_artifact(markdown=markdown, key=key, description=title, _sync=True))  # type: ignore[call-arg]
