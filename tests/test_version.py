"""cutlass_moe.__version__ comes from whichever distribution (source or -cu12/-cu13) is installed."""

from __future__ import annotations

import importlib.metadata

import pytest

from cutlass_moe import _version


@pytest.mark.parametrize("installed", ["cutlass-moe", "cutlass-moe-cu12", "cutlass-moe-cu13"])
def test_version_of_each_distribution_name(monkeypatch, installed):
    def version(name):
        if name == installed:
            return "1.2.3"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _version._read_version() == "1.2.3"


def test_version_without_any_distribution(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _version._read_version() == "0.0.0+unknown"
