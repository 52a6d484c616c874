"""Side-by-side view of `cutlass-moe bench --out X.csv` runs of one preset with different weight
types (bf16, int8, int4, fp8, mxfp4): a markdown table (tuned latency, TB/s over each row's own
bytes, memory-floor and compute fractions, speed-up over the bf16 row of the same T, and the
default tactics' latency against the tuned one) and, with --plot, latency against T per weight
type.

    python tools/compare_weights.py tools/perf/h200_*_mixtral-8x7b.csv --plot mixtral.png

Each CSV's label is its `weights` column, plus `_asym` when the file name says so.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def _label(path: Path, row: dict[str, str]) -> str:
    return row["weights"] + ("_asym" if "asym" in path.name else "")


def load(paths: list[Path]) -> dict[str, dict[int, dict[str, dict[str, str]]]]:
    """{label: {T: {impl: row}}} over every CSV (cutlass_moe rows only)."""
    found: dict[str, dict[int, dict[str, dict[str, str]]]] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                if not row["impl"].startswith("cutlass_moe"):
                    continue
                found[_label(path, row)][int(row["num_tokens"])][row["impl"]] = row
    return found


def table(found: dict[str, dict[int, dict[str, dict[str, str]]]]) -> str:
    labels = sorted(found, key=lambda s: (s != "bf16", s))
    tokens = sorted({t for by_t in found.values() for t in by_t})
    lines = [("| T | weights | tuned µs | TB/s | mem | compute | vs bf16 | default µs | "
              "default / tuned |"),
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tokens:
        base = found.get("bf16", {}).get(t, {}).get("cutlass_moe_tuned")
        for label in labels:
            rows = found[label].get(t)
            if not rows:
                continue
            tuned = rows.get("cutlass_moe_tuned") or rows.get("cutlass_moe_default")
            default = rows.get("cutlass_moe_default")
            lat = float(tuned["latency_us"])
            speed = f"{float(base['latency_us']) / lat:.2f}x" if base is not None else "—"
            dflt = float(default["latency_us"]) if default else float("nan")
            lines.append(
                f"| {t} | {label} | {lat:.1f} | {float(tuned['tb_s']):.2f} | "
                f"{100 * float(tuned['mem_fraction']):.0f}% | "
                f"{100 * float(tuned['compute_fraction']):.0f}% | {speed} | {dflt:.1f} | "
                f"{dflt / lat:.2f} |")
    return "\n".join(lines)


def plot(found: dict[str, dict[int, dict[str, dict[str, str]]]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted(found):
        by_t = found[label]
        ts = sorted(by_t)
        lat = [float((by_t[t].get("cutlass_moe_tuned") or by_t[t]["cutlass_moe_default"])
                     ["latency_us"]) for t in ts]
        ax.plot(ts, lat, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("latency (µs, tuned, CUDA graph, L2 flushed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", type=Path, help="bench CSVs of one preset")
    parser.add_argument("--plot", type=Path, help="write a latency-vs-T plot (needs matplotlib)")
    parser.add_argument("--title", default=None, help="plot title (default: the preset)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.csv if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    found = load(args.csv)
    if not found:
        parser.error("no cutlass_moe rows in these files")
    print(table(found))
    if args.plot:
        presets = {row["preset"] for by_t in found.values() for rows in by_t.values()
                   for row in rows.values()}
        plot(found, args.title or ", ".join(sorted(presets)), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
