"""Runs cutlass_fused_moe on a model-shaped layer, checks it against reference_moe and times it.

    python -m cutlass_moe.demo [--model mixtral-8x7b] [--dtype bf16] [--tokens 1 128 4096]

Random weights of the model's shape and random router-like routing (softmax, top-k) per token
count. Prints one row per token count: T, eager_us (one call from an idle GPU, host overhead
included), graph_us (one replay of the call captured in a CUDA graph), rel_err (relative L2
error against reference_moe in float32) and check (pass when rel_err is within the dtype's
threshold). Exits 1 if a check fails, 2 when no CUDA device or compiled extension is available.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch

from . import _ext, synthetic, timing
from .activation import ActivationType
from .ops import cutlass_fused_moe
from .presets import MODEL_PRESETS
from .reference import reference_moe

logger = logging.getLogger("cutlass_moe.demo")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Relative L2 error thresholds against the float32 reference (docs/architecture.md,
#: "Correctness").
REL_ERR_THRESHOLD = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def relative_l2_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are empty)."""
    out64, ref64 = out.double(), ref.double()
    denom = ref64.norm().item()
    if denom == 0.0:
        return 0.0 if out64.norm().item() == 0.0 else float("inf")
    return (out64 - ref64).norm().item() / denom


def run_demo(
    model: str,
    dtype_name: str,
    token_counts: list[int],
    repeats: int,
    device: torch.device | None = None,
) -> list[tuple[int, float, float, float, bool]]:
    """Checks and times every token count; returns rows
    ``(T, eager_us, graph_us, rel_err, passed)``: ``eager_us`` is one call from an idle GPU
    (host overhead included), ``graph_us`` one replay of the call captured in a CUDA graph (what
    a serving engine that captures its decode step sees; nan for ``T = 0``). A preset with a
    clamped SwiGLU (gpt-oss) passes its clamp to both ``cutlass_fused_moe`` and
    ``reference_moe``. Runs on ``device`` (default: the current CUDA device)."""
    preset = MODEL_PRESETS[model]
    dtype = _DTYPES[dtype_name]
    device = torch.device("cuda") if device is None else device
    w1, w2 = synthetic.make_layer(preset, dtype, device)
    clamp = synthetic.swiglu_clamp(preset, device)
    threshold = REL_ERR_THRESHOLD[dtype]
    rows = []
    for seed, num_tokens in enumerate(token_counts, start=1):
        x, ids, scales = synthetic.make_tokens(preset, num_tokens, dtype, device, seed)
        out = cutlass_fused_moe(x, ids, scales, w1, w2, dtype, **clamp)[0]
        ref = reference_moe(x, ids, scales, w1, w2, ActivationType.Swiglu, **clamp)
        rel_err = relative_l2_error(out.float(), ref)
        output = torch.empty_like(out)

        def call(x: torch.Tensor = x, ids: torch.Tensor = ids, scales: torch.Tensor = scales,
                 output: torch.Tensor = output) -> None:
            cutlass_fused_moe(x, ids, scales, w1, w2, dtype, output=output, **clamp)

        latency = timing.time_us([call], warmup=5, repeats=repeats)
        graph_latency = math.nan
        if num_tokens > 0:  # a call with no tokens launches nothing: there is no graph to time
            graph = timing.capture_graph(call)
            graph_latency = timing.time_us([graph.replay], warmup=5, repeats=repeats)
            del graph
        passed = rel_err <= threshold
        if not passed:
            logger.warning("T=%d: rel_err %.3g exceeds %.1g", num_tokens, rel_err, threshold)
        rows.append((num_tokens, latency, graph_latency, rel_err, passed))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cutlass_moe.demo``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cutlass_moe.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODEL_PRESETS), default="mixtral-8x7b",
                        help="the layer shape (default: mixtral-8x7b)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16",
                        help="activation and weight dtype (default: bf16)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096],
                        help="token counts, one row each (default: 1 128 4096)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed runs, the median is reported (default: 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if any(t < 0 for t in args.tokens):
        parser.error("--tokens must be >= 0")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if not torch.cuda.is_available():
        logger.error("no CUDA device is available; the demo needs an NVIDIA GPU")
        return 2
    if not _ext.extension_available():
        logger.error("%s", _ext.build_info()["extension_error"])
        return 2

    preset = MODEL_PRESETS[args.model]
    logger.info("%s %s on %s: %s", args.model, args.dtype, torch.cuda.get_device_name(),
                preset.describe())
    rows = run_demo(args.model, args.dtype, args.tokens, args.repeats)
    threshold = REL_ERR_THRESHOLD[_DTYPES[args.dtype]]
    print(f"{'T':>6} {'eager_us':>10} {'graph_us':>10} {'rel_err':>10}  "
          f"check (rel_err <= {threshold:g})")
    for num_tokens, latency, graph_latency, rel_err, passed in rows:
        print(f"{num_tokens:>6} {latency:>10.1f} {graph_latency:>10.1f} {rel_err:>10.2e}  "
              f"{'pass' if passed else 'FAIL'}")
    return 0 if all(passed for *_, passed in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
