"""Site config validation: clear errors on bad files, secrets from the environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dfm_prefect.core.errors import ConfigError
from site_workers.config import load_site_config

GOOD = """
name: lab-1
operations: [core.echo]
sources:
  - name: t
    url: s3://bucket/t.zarr
    storage_options: {key: "${env:DFM_TEST_KEY}"}
result_store: {url: file:///tmp/dfm-test-store}
"""


def test_valid_config_resolves_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DFM_TEST_KEY", "s3cr3t")
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    config = load_site_config(path)
    assert config.sources[0].storage_options == {"key": "s3cr3t"}
    assert "s3cr3t" not in repr(config)


def test_missing_env_var_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DFM_TEST_KEY", raising=False)
    path = tmp_path / "site.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="DFM_TEST_KEY is not set"):
        load_site_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\noperations: []\nresult_store: {url: /tmp/x}\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("name: Bad Name\noperations: []\nresult_store: {url: /tmp/x}\n", "site names are lowercase"),
        ("name: x\noperations: []\n", "result_store: Field required"),
        ("name: x\noperations: [\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: x\noperations: []\nresult_store: {url: /tmp/x}\nlimits: {concurrency: 0}\n", "limits.concurrency"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_site_config(path)


def test_site_check_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noperations: [no.such_op]\nresult_store: {url: " + str(tmp_path / "s") + "}\n")
    result = subprocess.run([sys.executable, "-m", "dfm_prefect.cli", "site", "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "not installed" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("name: x\noperations: [core.echo]\nresult_store: {url: " + str(tmp_path / "s") + "}\n")
    result = subprocess.run([sys.executable, "-m", "dfm_prefect.cli", "site", "check", str(good)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "core.echo" in result.stdout
