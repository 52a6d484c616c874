"""The installed package's version (from its metadata; a source tree reads "0.0.0+unknown").

The same import package ships as three distributions: ``cutlass-moe`` (built from source) and the
release wheels ``cutlass-moe-cu12`` / ``cutlass-moe-cu13``; the first one installed is read.
"""

from __future__ import annotations

import importlib.metadata

DISTRIBUTIONS = ("cutlass-moe", "cutlass-moe-cu12", "cutlass-moe-cu13")


def _read_version() -> str:
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0.0.0+unknown"


__version__: str = _read_version()
