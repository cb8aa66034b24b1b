"""The retention examples of the docs run: the site-admin page's YAML and commands, and the modules' docstring examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

import site_workers.retention
import site_workers.retention_config
from site_workers.config import StoreConfig, parse_site_config
from tests.conftest import ROOT

FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def section(page: Path, title: str) -> str:
    text = page.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_retention_section_of_the_site_admin_page_runs(tmp_path: Path):
    blocks = FENCE.findall(section(ROOT / "docs" / "site-admin.md", "Retention"))
    files = {re.search(r'title="([^"]+)"', info).group(1): body for lang, info, body in blocks if lang == "yaml"}
    shell = "\n".join(body for lang, _, body in blocks if lang == "bash")
    assert list(files) == ["st-anne-retention.yaml"] and "site gc" in shell
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {**os.environ, "TUTORIAL_HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + shell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "site st-anne: would remove 0 result(s)" in done.stdout and "limit 20,000,000,000 bytes" in done.stdout
    assert (tmp_path / "results" / "st-anne" / ".retention").is_dir()  # the ledger's folder, made by the first gc


def test_the_docstring_examples_of_the_retention_modules_run(tmp_path: Path, monkeypatch):
    config = site_workers.retention_config.__doc__.split("Example::", 1)[1]
    store = StoreConfig.model_validate(yaml.safe_load(textwrap.dedent(config))["result_store"])
    assert store.retention.max_age_s == 604800 and store.retention.max_bytes_per_client == 5_000_000_000

    example = site_workers.retention.__doc__.split("::", 1)[1]
    site = {"name": "north", "operations": [], "result_store": {"url": f"file://{tmp_path / 'store'}", "retention": {"max_age_s": 60}}}
    parse_site_config(site)
    (tmp_path / "north.yaml").write_text(yaml.safe_dump(site))
    monkeypatch.chdir(tmp_path)
    exec(compile(textwrap.dedent(example), "site_workers.retention", "exec"), {})
