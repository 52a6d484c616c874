"""Runs cutlass_fused_moe on a model-shaped layer, checks it against reference_moe and times it.

    python -m cutlass_moe.demo [--model mixtral-8x7b] [--dtype bf16] [--tokens 1 128 4096]

Prints one row per token count (T, latency_us, rel_err, check) and exits 1 if a check fails,
2 when no CUDA device is available.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch

from . import _ext, bench
from .activation import ActivationType
from .ops import cutlass_fused_moe
from .presets import DESIGN_PRESETS as MODEL_PRESETS
from .presets import ModelPreset
from .reference import reference_moe

logger = logging.getLogger("cutlass_moe.demo")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Relative L2 error thresholds of DESIGN.md §8.
REL_ERR_THRESHOLD = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def relative_l2_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are empty)."""
    out64, ref64 = out.double(), ref.double()
    denom = ref64.norm().item()
    if denom == 0.0:
        return 0.0 if out64.norm().item() == 0.0 else float("inf")
    return (out64 - ref64).norm().item() / denom


def make_layer(
    preset: ModelPreset, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random SwiGLU expert weights ``([E, 2I, H], [E, H, I])`` scaled 1/sqrt(fan_in)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    e, h, i = preset.num_experts, preset.hidden_size, preset.inter_size
    w1 = torch.randn(e, 2 * i, h, device=device, dtype=dtype, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, device=device, dtype=dtype, generator=gen) * i**-0.5
    return w1, w2


def make_tokens(
    preset: ModelPreset, num_tokens: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x [T, H]`` and softmax/top-k routing ``(ids int32 [T, k], scales f32 [T, k])``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, preset.hidden_size, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(num_tokens, preset.num_experts, device=device, generator=gen)
    scales, ids = torch.softmax(logits, dim=-1).topk(preset.top_k, dim=-1)
    scales = scales / scales.sum(dim=-1, keepdim=True)
    return x, ids.to(torch.int32), scales.to(torch.float32)


def run_demo(
    model: str, dtype_name: str, token_counts: list[int], repeats: int
) -> list[tuple[int, float, float, float, bool]]:
    """Checks and times every token count; returns rows
    ``(T, eager_us, graph_us, rel_err, passed)``: ``eager_us`` is one call from an idle GPU
    (host overhead included), ``graph_us`` one replay of the call captured in a CUDA graph (what
    a serving engine that captures its decode step sees)."""
    preset = MODEL_PRESETS[model]
    dtype = _DTYPES[dtype_name]
    device = torch.device("cuda")
    w1, w2 = make_layer(preset, dtype, device)
    threshold = REL_ERR_THRESHOLD[dtype]
    rows = []
    for seed, num_tokens in enumerate(token_counts, start=1):
        x, ids, scales = make_tokens(preset, num_tokens, dtype, device, seed)
        out = cutlass_fused_moe(x, ids, scales, w1, w2, dtype)[0]
        ref = reference_moe(x, ids, scales, w1, w2, ActivationType.Swiglu)
        rel_err = relative_l2_error(out.float(), ref)
        output = torch.empty_like(out)

        def call(x=x, ids=ids, scales=scales, output=output) -> None:
            cutlass_fused_moe(x, ids, scales, w1, w2, dtype, output=output)

        latency = bench.time_us([call], warmup=5, repeats=repeats)
        graph_latency = math.nan
        if num_tokens > 0:  # a call with no tokens launches nothing: there is no graph to time
            graph = bench.capture_graph(call)
            graph_latency = bench.time_us([graph.replay], warmup=5, repeats=repeats)
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
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="mixtral-8x7b")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs (median reported)")
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
    logger.info("%s %s on %s: E=%d H=%d I=%d k=%d", args.model, args.dtype,
                torch.cuda.get_device_name(), preset.num_experts, preset.hidden_size,
                preset.inter_size, preset.top_k)
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
