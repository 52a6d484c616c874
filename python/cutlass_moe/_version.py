"""The installed package's version (from its metadata; a source tree reads "0.0.0+unknown")."""

from __future__ import annotations

import importlib.metadata


def _read_version() -> str:
    try:
        return importlib.metadata.version("cutlass-moe")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


__version__: str = _read_version()
