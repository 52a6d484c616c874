#!/usr/bin/env python3
"""The MoE layer benchmark from a checkout: ``cutlass-moe bench`` with the same options.

    python tools/bench_moe.py --model all --graph --stages --out bench/moe.csv --plot bench/moe.png

An installed ``cutlass_moe`` (with its compiled extension) is used when there is one; otherwise
the checkout's ``python/`` directory (whose package needs a built ``_C`` to run on the GPU).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    """Runs ``cutlass-moe bench`` with this script's arguments; returns its exit status."""
    if importlib.util.find_spec("cutlass_moe") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from cutlass_moe import cli  # after the path is set up: the checkout's package

    return cli.main(["bench", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
