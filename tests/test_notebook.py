"""The example notebook, executed for real: a Jupyter kernel against the session's federation, on each transport.

The kernel is this interpreter (a kernelspec written to a temporary
``JUPYTER_PATH``), so it sees exactly what the tests see. The notebook's
parameters cell is replaced with the running federation's file.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TRANSPORTS

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "examples" / "federation.ipynb"
KERNEL = "dfm-prefect-tests"
CELL_TIMEOUT_S = 300
ARRIVAL = re.compile(r"^arrived after\s+([0-9.]+) s: (\S+) (\d{4}), its mean ([0-9.]+)$", re.M)
STREAMED = re.compile(r"^item (\d+) after\s+([0-9.]+) s: running mean [0-9.]+$", re.M)
SAME = re.compile(r"^flow equals direct calls: (True|False) \(largest relative difference ([0-9.e+-]+)\)$", re.M)


def kernelspec(root: Path) -> Path:
    """A kernelspec that starts ipykernel on this interpreter; returns the directory to put on ``JUPYTER_PATH``."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dfm-prefect tests",
                "language": "python",
            }
        )
    )
    return root


def execute(federation_file: Path, prefect_api: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run every cell of the notebook against ``federation_file``; return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    parameters.source = "\n".join(
        [
            f"FEDERATION = {str(federation_file)!r}",
            'DATASETS = ["dfm://north/temperature", "dfm://south/temperature"]',
            "YEARS = [2000, 2001]",
            'VARIABLE = "temperature"',
        ]
    )
    # Jupyter and IPython keep their files under the test's directory, not the user's home.
    monkeypatch.setenv("JUPYTER_PATH", str(kernelspec(workdir / "jupyter")))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(workdir / "jupyter" / "runtime"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DFM_", "PYTEST"))},
        "IPYTHONDIR": str(workdir / "ipython"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return notebook


def outputs(notebook: Any) -> tuple[str, list[dict[str, Any]]]:
    """All the text the cells printed, and every rich output (display data and results)."""
    text, rich = [], []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                text.append(output["text"])
            elif output["output_type"] in ("display_data", "execute_result"):
                rich.append(output)
    return "".join(text), rich


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_notebook_runs_against_a_live_federation(transport, request, prefect_api, tmp_path, monkeypatch):
    federation = request.getfixturevalue("federation" if transport == "local" else "flare_federation")
    notebook = execute(Path(federation.federation_file), prefect_api, tmp_path, monkeypatch)
    printed, rich = outputs(notebook)

    # Every site answered for every year, each arrival timed, in the order they came.
    arrivals = [(float(seconds), site, int(year)) for seconds, site, year, _ in ARRIVAL.findall(printed)]
    assert sorted((site, year) for _, site, year in arrivals) == [("north", 2000), ("north", 2001), ("south", 2000), ("south", 2001)], printed
    times = [seconds for seconds, _, _ in arrivals]
    assert times == sorted(times) and times[0] > 0, arrivals

    # The live plots end as pictures in the saved notebook: one per plot, not one per arrival
    # (each redraw replaced the previous one).
    pictures = [output for output in rich if "image/png" in output.get("data", {})]
    assert len(pictures) == 2, [output.get("data", {}).keys() for output in rich]

    # The stream's items came one by one, in order, and add up to the whole.
    items = [(int(n), float(seconds)) for n, seconds in STREAMED.findall(printed)]
    assert [n for n, _ in items] == list(range(1, len(items) + 1)) and len(items) > 1, printed
    assert [s for _, s in items] == sorted(s for _, s in items)
    assert f"stream of {len(items)} items equals the whole: True" in printed

    # The flow made the same calls and got the same answer.
    (same,) = SAME.findall(printed)
    assert same[0] == "True" and float(same[1]) == 0.0, printed
