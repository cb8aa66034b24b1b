"""The site configs docs/adapters.md shows are valid, and the configs the adapters refuse are refused."""

from __future__ import annotations

import re

import pytest
import yaml

from dfm_prefect.core.errors import ConfigError
from site_workers.config import parse_site_config
from tests.conftest import ROOT

BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "adapters.md").read_text(), re.S)


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("CLINIC_DB_PASSWORD", "pw-for-the-docs-example")
    monkeypatch.setenv("RISK_MODEL_TOKEN", "token-for-the-docs-example")


def test_the_page_shows_a_config_per_adapter():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("block", BLOCKS, ids=["databases", "services", "programs"])
def test_each_example_config_validates(block, credentials):
    config = parse_site_config(yaml.safe_load(block))
    assert config.databases or config.services or config.programs
    assert "pw-for-the-docs-example" in config.env_secrets or not config.databases


BASE = {"name": "lab", "result_store": {"url": "file:///tmp/dfm-docs-store"}}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"operations": ["sql.select"]}, "declares none"),
        ({"operations": [], "databases": [{"name": "db", "url": "postgresql://u:secret@h/db"}]}, "must not carry a password"),
        ({"operations": [], "databases": [{"name": "db", "url": "not a url"}]}, "not a SQLAlchemy URL"),
        (
            {"operations": [], "databases": [{"name": "db", "url": "sqlite:///x.db", "queries": [{"name": "q", "sql": "SELECT 1", "params": {"x": {"type": "integer"}}}]}]},
            "does not use",
        ),
        (
            {"operations": [], "databases": [{"name": "db", "url": "sqlite:///x.db", "queries": [{"name": "q", "sql": "SELECT 1", "result": "aggregate"}]}]},
            "counts",
        ),
        ({"operations": [], "programs": [{"name": "p", "executable": "tool", "output": {"path": "o.json"}}]}, "executable"),
        ({"operations": [], "programs": [{"name": "p", "executable": "/bin/tool", "argv": ["{nope}"], "output": {"path": "o.json"}}]}, "neither"),
        ({"operations": [], "programs": [{"name": "p", "executable": "/bin/tool", "output": {"path": "../o.json"}}]}, "output.path"),
        ({"operations": [], "services": [{"name": "s", "base_url": "http://u:p@h/", "openapi": "/x.json", "operations": {"a": {}}}]}, "base_url"),
    ],
)
def test_bad_declarations_are_refused_with_the_reason(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_site_config({**BASE, **extra})


def test_credentials_written_in_the_file_are_secrets_too(tmp_path):
    from site_workers.redaction import Redactor

    config = parse_site_config(
        {
            **BASE,
            "operations": [],
            "databases": [{"name": "db", "url": "sqlite:///x.db", "password": "literal-db-password", "connect_args": {"sslpassword": "literal-ssl-pass"}}],
            "services": [{"name": "s", "base_url": "http://h:1", "openapi": "/x.json", "operations": {"a": {}}, "headers": {"X-Api-Key": "literal-api-key"}}],
        }
    )
    redactor = Redactor.for_config(config)
    text = redactor.text("db literal-db-password ssl literal-ssl-pass key literal-api-key")
    assert "literal" not in text and text.count("[redacted]") == 3
