"""The documentation site: it builds with strict checks, and every example on its executed pages runs.

A page's examples run in order, in one working directory shared by the pages
(the tutorial's files stay for the pages after it), against a real federation
that the pages start themselves:

- a fenced file with a title (```` ```python title="x.py" ````, yaml likewise) is
  written under that name before the page's shell blocks run;
- the ```` ```bash ```` blocks of a page run as one script (``set -euo pipefail``),
  so a failing command fails the test;
- a block titled "another terminal" runs in the background until the page ends
  (a Prefect worker), except ``prefect server start``: the session's Prefect
  server stands in for it, and the pages' ``127.0.0.1:4200`` is rewritten to it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DOCS = ROOT / "docs"
EXECUTED = ["tutorial.md", "combine.md", "site-admin.md", "prefect.md"]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
TITLE = re.compile(r'title="([^"]+)"')
BACKGROUND = "another terminal"


def blocks(page: str) -> list[tuple[str, str | None, str]]:
    """(language, title, body) of each fenced block of a page, in order."""
    return [(lang, (TITLE.search(info) or [None, None])[1], body) for lang, info, body in FENCE.findall((DOCS / page).read_text())]


def test_the_site_builds_with_strict_checks(tmp_path: Path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    operations = (tmp_path / "site" / "operations" / "index.html").read_text()
    for name in ("table.groupby_aggregate", "xarray.moments", "Condition", "aggregations"):
        assert name in operations, name
    admin = (tmp_path / "site" / "site-admin" / "index.html").read_text()
    for key in ("result_store", "share_logs", "min_group_size", "concurrency", "storage_options", "ExportPolicy"):
        assert key in admin, key
    combine = (tmp_path / "site" / "combine" / "index.html").read_text()
    assert "combine_grouped" in combine and "combine_moments" in combine


def test_every_executed_page_has_examples_and_every_python_file_is_run():
    for page in EXECUTED:
        found = blocks(page)
        shell = "\n".join(body for lang, _, body in found if lang == "bash")
        assert shell, f"{page} has no shell example"
        for lang, title, _ in found:
            if lang == "python":
                assert title, f"{page}: a Python example without a file name is never run"
                assert re.search(rf"python {re.escape(title)}\b", shell), f"{page}: {title} is never run by a shell block"


def _run_page(page: str, workdir: Path, env: dict[str, str], api_host: str) -> None:
    script = ["set -euo pipefail"]
    background: list[subprocess.Popen[bytes]] = []
    try:
        for lang, title, body in blocks(page):
            body = body.replace("127.0.0.1:4200", api_host)
            if lang in ("python", "yaml") and title and title != BACKGROUND:
                (workdir / title).write_text(body)
            elif lang == "bash" and title == BACKGROUND:
                if body.strip().startswith("prefect server start"):
                    continue  # the session's server stands in for it
                _flush(script, page, workdir, env)
                log = open(workdir / f"background-{len(background)}.log", "wb")
                background.append(subprocess.Popen(["bash", "-c", body], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            elif lang == "bash":
                script.append(f"echo '+ ({page})' {_quote(body.strip().splitlines()[0])} >&2")
                script.append(body)
        _flush(script, page, workdir, env)
    finally:
        for process in background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _flush(script: list[str], page: str, workdir: Path, env: dict[str, str]) -> None:
    if len(script) == 1:
        return
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{page}: an example failed\n{done.stdout[-4000:]}\n{done.stderr[:6000]}"
    del script[1:]


def test_every_example_of_the_executed_pages_runs(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    workdir = tmp_path_factory.mktemp("docs-examples")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DFM_", "PYTEST"))},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "160",
    }
    env.pop("PYTHONPATH", None)  # the pages use the installed project, as a reader would
    (workdir / "examples").symlink_to(ROOT / "examples")  # as in the reader's clone of the repository
    api_host = urlsplit(prefect_api).netloc
    try:
        for page in EXECUTED:
            _run_page(page, workdir, env, api_host)
    finally:
        if (workdir / ".dfm" / "processes.json").exists():
            subprocess.run([shutil.which("dfm-prefect", path=env["PATH"]) or "dfm-prefect", "federation", "down", "--workdir", ".dfm"], cwd=workdir, env=env, timeout=120)
