"""Transports are found through the entry-point registry only, with both their sides."""

from __future__ import annotations

import importlib

import pytest

from dfm_prefect.core.errors import ConfigError
from dfm_prefect.transports import Launcher, Transport, launcher_class, transport_class, transport_names


def test_the_shipped_transports_are_registered():
    assert {"flare", "local"} <= set(transport_names())


@pytest.mark.parametrize("name", transport_names())
def test_each_transport_gives_its_client_side_and_launcher_after_all_its_modules_are_loaded(name):
    package = importlib.import_module(f"dfm_prefect.transports.{name}")
    for module in ("client", "launcher", "deploy.launcher", "server"):
        try:
            importlib.import_module(f"{package.__name__}.{module}")  # a submodule must not shadow the hooks
        except ModuleNotFoundError:
            pass
    cls, launcher = transport_class(name), launcher_class(name)
    assert issubclass(cls, Transport) and issubclass(launcher, Launcher)
    assert cls.Spec.model_fields["transport"].default == name


def test_an_unknown_transport_is_refused_with_the_installed_ones():
    with pytest.raises(ConfigError, match=r"unknown transport 'carrier-pigeon'.*'flare'.*'local'"):
        transport_class("carrier-pigeon")
    with pytest.raises(ConfigError, match="unknown transport"):
        launcher_class("carrier-pigeon")
