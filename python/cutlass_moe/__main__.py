"""``python -m cutlass_moe``: the ``cutlass-moe`` command line (see :mod:`cutlass_moe.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
