"""The MoE layer benchmark behind ``cutlass-moe bench`` (docs/architecture.md, "Benchmark").

For each model preset (or explicit shape) and token count ``T`` it times ``cutlass_fused_moe``
(tuned and/or heuristic-default tactics, eagerly or as CUDA-graph replays) and, in the same run,
its peers: the naive torch loop over experts (what Hugging Face transformers does), a
``torch._grouped_mm`` MoE where the installed torch has it, and ``reference_moe`` (float32).

Method:

* Routing is random (:func:`cutlass_moe.synthetic.make_routing`): ``k`` distinct experts per
  token, uniform or Zipf-skewed (expert popularity ``~ 1/rank``). Several input/routing sets are
  rotated (``rotate``, automatic by default: enough sets that their activations exceed twice
  the L2 size, at most :data:`MAX_ROTATE`).
* The L2 cache is flushed before every timed call by *reading* a buffer of twice the L2 size
  (:class:`cutlass_moe.timing.L2Flusher`: reads leave clean lines, so no write-back lands in
  the timed call). Flushing, rather than rotating weight copies, is what keeps the weights
  cold: one flush covers weights and activations of every model, whereas rotating copies of,
  e.g., Qwen3-30B-A3B's 1.2 GB of expert weights would cost memory per copy and still need
  enough copies to exceed L2 at every ``T``. Real layers read their weights cold too (the next
  layer's experts are other tensors).
* Each sample is one call (or one graph replay) between CUDA events after the flush and a
  synchronise (:func:`cutlass_moe.timing.time_us`), so eager numbers include the host overhead
  of one call from an idle GPU; the median of ``repeats`` samples after ``warmup`` untimed calls
  is reported.
* Ceilings are measured in the same run: the copy bandwidth of a 1 GiB device-to-device copy
  (bytes read + written over time), the dense GEMM rate of cuBLAS (``torch.matmul``, 8192^3)
  and of our own CUTLASS Sm80 grouped GEMM with one expert (T=8192, H=I=8192, best tactic).
* Each row: latency, achieved TB/s over the bytes of the experts actually touched (experts with
  at least one row, counted on the host before timing: fc1+fc2 weights, int8 scales, or int4's
  half byte per weight plus its group-wise scales (and zeros), fp8's byte per weight plus
  4-byte scales per group, or MXFP4's half byte plus one byte of scale per 32 weights,
  activations in and out), TFLOP/s (``2*T*k*(N1*H + H*I)``), the memory floor (bytes over copy
  bandwidth)
  and the fractions ``floor/latency`` and ``TFLOP/s / Sm80 rate``.
* ``stages``: a torch.profiler trace of a few calls of our op, kernels mapped to routing, gather,
  grouped-GEMM arguments, GEMM1, activation, GEMM2 and finalize.

Everything that touches the GPU is guarded; the pure functions (bytes, FLOPs, floors, stage
mapping, writers) run anywhere.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from . import _ext, autotuner, synthetic, tactics, timing, validation
from .activation import ActivationType
from .ops import cutlass_fused_moe
from .presets import ModelPreset
from .quantization import quantize_moe_weights_int8
from .reference import _clamped_swiglu, apply_activation, reference_moe
from .tables import format_table
from .tuning_cache import QUANT_NONE, ShapeKey, dtype_tag

logger = logging.getLogger("cutlass_moe.bench")

DEFAULT_BENCH_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)

IMPL_TUNED = "cutlass_moe_tuned"
IMPL_DEFAULT = "cutlass_moe_default"
PEERS = ("naive", "grouped_mm", "reference")
IMPLS = (IMPL_TUNED, IMPL_DEFAULT, *PEERS)
#: reference_moe computes in float32 and is slow: it is skipped above this many tokens.
REFERENCE_MAX_TOKENS = 2048
#: The reference's warm-up and repeats are capped (it takes up to seconds per call).
REFERENCE_MAX_REPEATS = 5

#: Stages of one call, in launch order (``other``: unrecognised kernels inside a call).
STAGES = ("routing", "gather", "gemm_args", "gemm1", "activation", "gemm2", "finalize", "other")
#: Calls traced for the stage breakdown.
STAGE_CALLS = 5

#: Ceiling measurements: bytes of the device-to-device copy, size of the square dense GEMMs.
COPY_BYTES = 1 << 30
DENSE_GEMM_SIZE = 8192
CEILING_REPEATS = 10
#: The most input/routing sets rotated through (see :func:`rotation_count`).
MAX_ROTATE = 16


# ------------------------------------------------------------------------------------------
# Pure arithmetic: bytes, FLOPs, floors, rotation
# ------------------------------------------------------------------------------------------


#: The int4 group size of the benchmark and the tuner when none is given (``--group-size``).
DEFAULT_INT4_GROUP_SIZE = 128
#: The fp8 group size of the benchmark and the tuner when none is given (``--group-size``).
DEFAULT_FP8_GROUP_SIZE = 128
#: MXFP4's group size (fixed: one e8m0 scale per 32 weights).
MXFP4_GROUP_SIZE = validation.MXFP4_GROUP_SIZE
#: The ``--weights`` values with group-wise scales (``--group-size``).
GROUP_SCALED_WEIGHTS = ("int4", "fp8", "mxfp4")


def expert_weight_bytes(preset: ModelPreset, weights: str, act_bytes: int,
                        group_size: int = DEFAULT_INT4_GROUP_SIZE,
                        asymmetric: bool = False) -> int:
    """Bytes of one expert's fc1 + fc2 weights: ``weights`` ``"16bit"`` (``act_bytes`` per
    weight), ``"int8"`` (1 byte per weight plus per-channel scales ``[N1]`` and ``[H]`` in
    the activation dtype) or ``"int4"`` (half a byte per weight — packed ``[N1, H/2]`` and
    ``[H, I/2]`` — plus group-wise scales ``[H/G, N1]`` and ``[I/G, H]`` in the activation
    dtype, twice that with zero points (``asymmetric``); ``group_size`` is ``G``, which must
    divide ``H`` and ``I``), ``"fp8"`` (1 byte per weight plus float32 group-wise scales, 4
    bytes per ``G`` weights) or ``"mxfp4"`` (half a byte per weight plus one uint8 e8m0 scale
    per 32 weights; ``group_size`` is ignored)."""
    n1, h, i = preset.fc1_rows, preset.hidden_size, preset.inter_size
    count = n1 * h + h * i
    if weights == "int8":
        return count + (n1 + h) * act_bytes
    if weights == "16bit":
        return count * act_bytes
    if weights == "mxfp4":
        return count // 2 + count // MXFP4_GROUP_SIZE
    if weights in ("int4", "fp8"):
        if group_size < 1 or h % group_size or i % group_size:
            raise ValueError(f"group_size={group_size} must divide H={h} and I={i}")
        groups = (n1 * h + h * i) // group_size  # scale (and zero) entries of both GEMMs
        if weights == "fp8":
            return count + groups * 4
        return count // 2 + groups * act_bytes * (2 if asymmetric else 1)
    raise ValueError(f"weights must be '16bit', 'int8', 'int4', 'fp8' or 'mxfp4', got "
                     f"{weights!r}")


def count_touched_experts(ids: torch.Tensor, num_experts: int) -> int:
    """Experts with at least one row in routing ``ids`` (``[T, k]``; ids outside
    ``[0, num_experts)`` route nowhere). Synchronises on a GPU tensor: call before timing."""
    unique = torch.unique(ids.reshape(-1))
    return int(((unique >= 0) & (unique < num_experts)).sum())


def bytes_touched(preset: ModelPreset, num_tokens: int, experts_touched: float, weights: str,
                  act_bytes: int, out_bytes: int, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                  asymmetric: bool = False) -> float:
    """Bytes one call must move at least: the weights of every touched expert
    (:func:`expert_weight_bytes`; ``group_size``/``asymmetric`` for int4) plus the activations
    in (``T*H*act_bytes``) and out (``T*H*out_bytes``). ``experts_touched`` may be a mean over
    rotated routing sets."""
    activations = num_tokens * preset.hidden_size * (act_bytes + out_bytes)
    weight_bytes = expert_weight_bytes(preset, weights, act_bytes, group_size, asymmetric)
    return experts_touched * weight_bytes + activations


def moe_flops(preset: ModelPreset, num_tokens: int) -> float:
    """FLOPs of both GEMMs: ``2*T*k*(N1*H + H*I)`` (``2*T*k*3*H*I`` for the gated layers)."""
    h, i = preset.hidden_size, preset.inter_size
    return 2.0 * num_tokens * preset.top_k * (preset.fc1_rows * h + h * i)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, nan when either is not finite or the denominator <= 0."""
    if denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator):
        return numerator / denominator
    return math.nan


def memory_floor_us(nbytes: float, copy_tb_s: float) -> float:
    """The time to move ``nbytes`` at the measured copy bandwidth (TB/s), in us."""
    return ratio(nbytes, copy_tb_s * 1e6)


def rotation_count(bytes_per_set: float, l2_bytes: int, requested: int | None = None,
                   limit: int = MAX_ROTATE) -> int:
    """Input/routing sets to rotate: ``requested``, or enough that their activations exceed
    twice the L2 (at least 2, at most ``limit``)."""
    if requested is not None:
        return max(1, int(requested))
    if bytes_per_set <= 0:
        return limit
    return max(2, min(limit, math.ceil(2 * l2_bytes / bytes_per_set)))


def finite_or_none(value: Any) -> Any:
    """``value``, or None for a float inf/nan (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ceilings:
    """The machine's ceilings, measured in the run (nan where a measurement failed)."""

    dtype: str
    copy_tb_s: float  # (read + written bytes) / time of a COPY_BYTES device-to-device copy
    cublas_tflops: float  # torch.matmul, DENSE_GEMM_SIZE^3
    sm80_tflops: float  # our grouped GEMM, one expert, T=H=I=DENSE_GEMM_SIZE, best tactic
    sm80_tactic: str
    l2_bytes: int
    device: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchRow:
    """One implementation at one token count of one layer shape."""

    preset: str
    dtype: str
    weights: str  # the weights this implementation ran with ("bf16", "int8", ...)
    num_tokens: int
    impl: str  # one of IMPLS
    graph: bool  # timed as CUDA-graph replays
    latency_us: float  # median
    tb_s: float  # bytes_touched / latency
    tflops: float  # flops / latency
    mem_floor_us: float  # bytes_touched / copy bandwidth
    mem_fraction: float  # mem_floor_us / latency_us
    compute_fraction: float  # tflops / the Sm80 dense rate
    roofline_fraction: float  # max(mem_fraction, compute_fraction)
    experts_touched: float  # mean over the rotated routing sets
    bytes_touched: float
    flops: float
    tactic1: str = ""
    tactic2: str = ""
    source: str = ""  # where our tactics came from: "cache", "default", "cache+default", ...
    note: str = ""


@dataclasses.dataclass
class StageRow:
    """One stage of our op at one token count (from the profiler)."""

    preset: str
    dtype: str
    weights: str
    num_tokens: int
    impl: str
    stage: str  # one of STAGES
    us_per_call: float
    launches_per_call: float
    fraction: float  # of the kernel time of a call


@dataclasses.dataclass
class BenchConfig:
    """What ``run_bench`` measures (the ``cutlass-moe bench`` options)."""

    models: list[tuple[str, ModelPreset]]
    dtype: str = "bf16"  # "bf16" or "fp16"
    weights: str = "bf16"  # the --weights value: the dtype, "int8", "int4", "fp8" or "mxfp4"
    tokens: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_BENCH_TOKENS))
    routing: str = "uniform"
    tactics: str = "tuned"  # "tuned", "default" or "both"
    graph: bool = False
    warmup: int = 10
    repeats: int = 50
    max_tokens: int = 8192
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cuda"))
    seed: int = 0
    peers: tuple[str, ...] = PEERS
    stages: bool = False
    rotate: int | None = None  # None: automatic
    flush_l2: bool = True
    pdl: bool = True  # programmatic dependent launch where the GPU supports it
    group_size: int = DEFAULT_INT4_GROUP_SIZE  # int4/fp8 weights: G of both GEMMs (mxfp4: 32)
    asymmetric: bool = False  # int4 weights: with zero points

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-able values (also the CSV's extra columns)."""
        return {
            "models": [name for name, _ in self.models],
            "dtype": self.dtype, "weights": self.weights, "tokens": list(self.tokens),
            "routing": self.routing, "tactics": self.tactics, "graph": self.graph,
            "warmup": self.warmup, "repeats": self.repeats, "max_tokens": self.max_tokens,
            "seed": self.seed, "peers": list(self.peers), "stages": self.stages,
            "rotate": self.rotate if self.rotate is not None else "auto",
            "flush_l2": self.flush_l2, "pdl": self.pdl,
            **({"group_size": self.group_size, "asymmetric": self.asymmetric}
               if self.weights == "int4" else {}),
            **({"group_size": self.group_size} if self.weights in ("fp8", "mxfp4") else {}),
        }


@dataclasses.dataclass
class BenchResult:
    """What :func:`run_bench` measured: the ceilings, one row per implementation and token
    count, the stage rows (``stages``) and notes on what was skipped or failed."""

    ceilings: Ceilings
    rows: list[BenchRow]
    stages: list[StageRow] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def make_row(preset_name: str, preset: ModelPreset, dtype: str, weights: str, num_tokens: int,
             impl: str, graph: bool, latency_us: float, experts_touched: float,
             ceilings: Ceilings, act_bytes: int = 2,
             group_size: int = DEFAULT_INT4_GROUP_SIZE, asymmetric: bool = False,
             **extra: str) -> BenchRow:
    """A :class:`BenchRow` with its derived columns. ``weights`` is the weight type the
    implementation ran with ("int8", "int4", "fp8", "mxfp4" or a 16-bit dtype name;
    ``group_size`` describes int4 and fp8 weights, ``asymmetric`` int4 ones); the output has the
    activation dtype
    (``act_bytes``); ``extra``: tactic1, tactic2, source, note."""
    mode = weights if weights in ("int8", *GROUP_SCALED_WEIGHTS) else "16bit"
    nbytes = bytes_touched(preset, num_tokens, experts_touched, mode, act_bytes, act_bytes,
                           group_size, asymmetric)
    flops = moe_flops(preset, num_tokens)
    floor = memory_floor_us(nbytes, ceilings.copy_tb_s)
    tflops = ratio(flops, latency_us * 1e6)
    mem_fraction = ratio(floor, latency_us)
    compute_fraction = ratio(tflops, ceilings.sm80_tflops)
    fractions = [f for f in (mem_fraction, compute_fraction) if math.isfinite(f)]
    return BenchRow(
        preset=preset_name, dtype=dtype, weights=weights, num_tokens=num_tokens, impl=impl,
        graph=graph, latency_us=latency_us, tb_s=ratio(nbytes, latency_us * 1e6),
        tflops=tflops, mem_floor_us=floor, mem_fraction=mem_fraction,
        compute_fraction=compute_fraction,
        roofline_fraction=max(fractions) if fractions else math.nan,
        experts_touched=experts_touched, bytes_touched=nbytes, flops=flops, **extra)


# ------------------------------------------------------------------------------------------
# Stage mapping (kernel names of src/*.cu)
# ------------------------------------------------------------------------------------------

# GEMM patterns come first: the CUTLASS kernels' template arguments are long names.
_STAGE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemm", ("grouped_kernel<", "cutlass::Kernel<", "cutlass::Kernel2<", "_ZN7cutlass6Kernel",
              "GemmGrouped", "GroupedGemm", "decode_gemm_kernel<")),
    ("routing", ("count_chunk_experts_kernel", "scan_chunk_counts_kernel",
                 "scatter_ranks_kernel")),
    ("gather", ("gather_rows_kernel",)),
    # Routing writes the GEMM arguments in a real call; this kernel runs only in profiling.
    ("gemm_args", ("write_gemm_args_kernel",)),
    ("activation", ("activation_kernel",)),
    ("finalize", ("finalize_kernel",)),
)


def kernel_stage(name: str) -> str | None:
    """The stage of a kernel name: ``"gemm"`` for a CUTLASS grouped GEMM (GEMM1 or GEMM2 by
    launch order), another name of :data:`STAGES`, or None for kernels that are not ours."""
    for stage, patterns in _STAGE_PATTERNS:
        if any(p in name for p in patterns):
            return stage
    return None


def assign_stages(kernels: Iterable[tuple[str, float]]
                  ) -> tuple[dict[str, tuple[float, int]], int]:
    """Sums ``(kernel name, duration us)`` in launch order per stage: ``({stage: (us,
    launches)}, calls)``. A call starts at its first routing kernel and ends at finalize;
    kernels outside calls (L2 flushes, other work) are ignored, unknown ones inside count as
    ``other``. The first grouped GEMM of a call is GEMM1, any later one GEMM2."""
    totals: dict[str, list[float]] = {stage: [0.0, 0] for stage in STAGES}
    calls = 0
    inside = False
    last: str | None = None
    gemms_in_call = 0
    for name, duration_us in kernels:
        stage = kernel_stage(name)
        if stage == "routing" and (not inside or last != "routing"):
            inside = True
            calls += 1
            gemms_in_call = 0
        if not inside:
            continue
        if stage == "gemm":
            gemms_in_call += 1
            stage = "gemm1" if gemms_in_call == 1 else "gemm2"
        elif stage is None:
            stage = "other"
        totals[stage][0] += duration_us
        totals[stage][1] += 1
        last = stage
        if stage == "finalize":
            inside = False
    return {stage: (us, int(n)) for stage, (us, n) in totals.items()}, calls


def stage_rows(totals: Mapping[str, tuple[float, int]], calls: int, **key: Any
               ) -> list[StageRow]:
    """Per-call :class:`StageRow` values of :func:`assign_stages`' result (stages with no
    launch are left out); ``key``: preset, dtype, weights, num_tokens, impl."""
    if calls <= 0:
        return []
    kernel_us = sum(us for us, _ in totals.values())
    return [StageRow(**key, stage=stage, us_per_call=us / calls, launches_per_call=n / calls,
                     fraction=ratio(us, kernel_us))
            for stage, (us, n) in totals.items() if n > 0]


def profile_kernels(fn: Callable[[], object], calls: int = STAGE_CALLS,
                    before_each: Callable[[], object] | None = None) -> list[tuple[str, float]]:
    """``(name, duration us)`` of the CUDA kernels (and memsets/copies) of ``calls`` calls of
    ``fn`` in start order, traced with torch.profiler. ``before_each`` (e.g. an L2 flush) runs
    before every call and is traced too. Raises RuntimeError when the profiler records no
    device activity."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            if before_each is not None:
                before_each()
            fn()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.events():
        if getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        kernels.append((event.time_range.start, event.name, event.time_range.elapsed_us()))
    if not kernels:
        raise RuntimeError("the profiler recorded no CUDA activity (CUPTI unavailable?)")
    kernels.sort(key=lambda k: k[0])
    return [(name, float(us)) for _, name, us in kernels]


# ------------------------------------------------------------------------------------------
# Peers
# ------------------------------------------------------------------------------------------


def swiglu_fn(preset: ModelPreset) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's activation on GEMM1's output ``[rows, 2I]`` (``[up | gate]``): SwiGLU, or
    gpt-oss's clamped SwiGLU (same alpha/beta/limit for every expert)."""
    if not preset.clamped_swiglu:
        return lambda h: apply_activation(h, ActivationType.Swiglu)
    alpha = 1.0 if preset.swiglu_alpha is None else preset.swiglu_alpha
    beta = 0.0 if preset.swiglu_beta is None else preset.swiglu_beta
    limit = torch.finfo(torch.float32).max if preset.swiglu_limit is None else preset.swiglu_limit

    def clamped(h: torch.Tensor) -> torch.Tensor:
        scalar = {"dtype": h.dtype, "device": h.device}
        return _clamped_swiglu(h, torch.tensor(alpha, **scalar), torch.tensor(beta, **scalar),
                               torch.tensor(limit, **scalar))

    return clamped


def naive_moe(x: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, w1: torch.Tensor,
              w2: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    """The Hugging Face style MoE loop (Mixtral's ``MixtralSparseMoeBlock``): for every expert
    that got tokens, ``torch.where`` its rows, two matmuls, ``index_add_``. ``x [T, H]``,
    ``ids/scales [T, k]``, ``w1 [E, 2I, H]``, ``w2 [E, H, I]``; returns ``[T, H]`` of
    ``x.dtype``. Synchronises with the host (not capturable)."""
    num_experts = w1.shape[0]
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids.long(), num_experts).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    weights = scales.to(x.dtype)
    for expert in hit:
        slot, token = torch.where(mask[expert])
        h = activation(x[token] @ w1[expert].t())
        y = (h @ w2[expert].t()) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


def grouped_mm_moe(x: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                   w1t: torch.Tensor, w2t: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor], align: int = 1
                   ) -> torch.Tensor:
    """An MoE on ``torch._grouped_mm``: rows sorted by expert, both GEMMs grouped by int32
    end offsets, then weighted ``index_add_``. ``w1t = w1.transpose(1, 2)`` (``[E, H, 2I]``)
    and ``w2t = w2.transpose(1, 2)`` (``[E, I, H]``), column-major views as the op wants.
    ``align > 1`` pads each expert's rows to a multiple of ``align`` (for torch builds that
    require it). No host synchronisation."""
    num_tokens, top_k = ids.shape
    num_experts = w1t.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    token = order // top_k
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    if align > 1:
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0)
        rank = (torch.arange(flat.numel(), device=x.device)
                - (torch.cumsum(counts, 0) - counts)[sorted_expert])
        pos = (ends - padded)[sorted_expert] + rank
        a = x.new_zeros(flat.numel() + (align - 1) * num_experts, x.shape[1])
        a[pos] = x[token]
    else:
        ends = torch.cumsum(counts, 0)
        pos = None
        a = x[token]
    offs = ends.to(torch.int32)
    h = activation(torch._grouped_mm(a, w1t, offs=offs))
    y = torch._grouped_mm(h, w2t, offs=offs)
    if pos is not None:
        y = y[pos]
    y = y.float() * scales.reshape(-1)[order, None]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------


def measure_ceilings(dtype: torch.dtype, device: torch.device, repeats: int = CEILING_REPEATS,
                     copy_bytes: int = COPY_BYTES, gemm_size: int = DENSE_GEMM_SIZE
                     ) -> Ceilings:
    """Copy bandwidth, cuBLAS and CUTLASS Sm80 dense GEMM rates of ``device`` (nan with a note
    for a measurement that fails). The CUTLASS rate is the best of the GEMM2 tactics that
    :func:`cutlass_moe.tactics.candidates` offers for that call."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    ceilings = Ceilings(name, math.nan, math.nan, math.nan, "", timing.l2_bytes(device))
    try:
        ceilings.device = f"{torch.cuda.get_device_name(device)} ({device})"
    except (RuntimeError, AssertionError, ValueError):  # not a CUDA device / CPU-only torch
        ceilings.device = str(device)
    with torch.cuda.device(device):
        try:
            src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            us = timing.time_us([lambda: dst.copy_(src)], 3, repeats)
            ceilings.copy_tb_s = 2 * copy_bytes / (us * 1e6)
        except RuntimeError as exc:
            ceilings.notes.append(f"copy bandwidth not measured: {exc}")
        n = gemm_size
        try:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            c = torch.empty(n, n, dtype=dtype, device=device)
            us = timing.time_us([lambda: torch.matmul(a, b, out=c)], 3, repeats)
            ceilings.cublas_tflops = 2.0 * n**3 / (us * 1e6)
        except RuntimeError as exc:
            ceilings.notes.append(f"cuBLAS rate not measured: {exc}")
        try:
            dtypes = (dtype, dtype, dtype)
            runner = _ext.get_runner(*dtypes)
            activation = ActivationType.Swiglu
            # One expert, T=n tokens, top_k 1: n expanded rows.
            names = tactics.candidate_names(dtypes, 2, activation, device, expanded_rows=n)
            shape = ShapeKey(dtype_tag(dtypes), QUANT_NONE, 1, n, n, 1, activation.name, 1)
            weights = synthetic.random_expert_weights(1, n, n, n, dtype, device)[1]
            results = [r for r in autotuner.profile_gemm(runner, 2, names, shape, n, activation,
                                                         weights, device)
                       if math.isfinite(r.time_us)]
            if not results:
                raise RuntimeError("no GEMM2 tactic ran")
            best = min(results, key=lambda r: r.time_us)
            ceilings.sm80_tflops = 2.0 * n**3 / (best.time_us * 1e6)
            ceilings.sm80_tactic = best.tactic
        except (RuntimeError, ValueError) as exc:
            ceilings.notes.append(f"CUTLASS Sm80 rate not measured: {exc}")
        torch.cuda.empty_cache()
    return ceilings


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def grouped_mm_available() -> bool:
    """Whether this torch has ``torch._grouped_mm`` (the grouped_mm peer needs it)."""
    return hasattr(torch, "_grouped_mm")


def _peer_repeats(impl: str, warmup: int, repeats: int) -> tuple[int, int]:
    if impl == "reference":
        return min(warmup, 1), min(repeats, REFERENCE_MAX_REPEATS)
    return warmup, repeats


class _Layer:
    """One preset's random weights on the GPU (16-bit, plus int8, int4, fp8 or mxfp4 when asked:
    ``weights`` is the --weights value) and its clamp. ``q1``/``q2`` and ``quant`` are what our
    op runs with; the peers run the 16-bit ``w1``/``w2``."""

    def __init__(self, preset: ModelPreset, dtype: torch.dtype, device: torch.device,
                 weights: str, seed: int, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 asymmetric: bool = False) -> None:
        self.w1, self.w2 = synthetic.make_layer(preset, dtype, device, seed=seed)
        self.quant: dict[str, Any] = {}
        self.q1: torch.Tensor | None = None
        self.q2: torch.Tensor | None = None
        self.weight_type: torch.dtype | str = dtype
        if weights == "int8":
            self.q1, self.q2, weight_scales = quantize_moe_weights_int8(self.w1, self.w2)
            self.quant = {"quant_scales": weight_scales, "use_int8_woq_per_channel": True}
            self.weight_type = torch.int8
        elif weights == "int4":
            layer = synthetic.quantize_layer_int4(self.w1, self.w2, group_size, asymmetric)
            self.q1, self.q2 = layer.weights
            self.quant = {"quant_scales": layer.quant_scales, "use_w4_group_scaling": True}
            self.weight_type = _ext.INT4
        elif weights in ("fp8", "mxfp4"):
            quantised = (synthetic.quantize_layer_fp8(self.w1, self.w2, group_size)
                         if weights == "fp8" else synthetic.quantize_layer_mxfp4(self.w1, self.w2))
            self.q1, self.q2 = quantised.weights
            self.quant = {"quant_scales": quantised.quant_scales, **quantised.call_flags}
            self.weight_type = _ext.FP8 if weights == "fp8" else _ext.MXFP4
        self.clamp = synthetic.swiglu_clamp(preset, device)


def run_bench(config: BenchConfig, ceilings: Ceilings | None = None) -> BenchResult:
    """Runs the benchmark of ``config`` on its CUDA device (measuring the ceilings first unless
    given) and returns every row, stage row and note."""
    device = config.device
    dtype = _DTYPES[config.dtype]
    with torch.cuda.device(device):
        if ceilings is None:
            ceilings = measure_ceilings(dtype, device)
        result = BenchResult(ceilings, [], [], list(ceilings.notes))
        flush = timing.L2Flusher(device, ceilings.l2_bytes) if config.flush_l2 else None
        for name, preset in config.models:
            layer = _Layer(preset, dtype, device, config.weights, config.seed,
                           config.group_size, config.asymmetric)
            for num_tokens in config.tokens:
                logger.info("%s: T=%d", name, num_tokens)
                _bench_one(config, name, preset, layer, num_tokens, result, flush)
            del layer
            torch.cuda.empty_cache()
    return result


def _bench_one(config: BenchConfig, name: str, preset: ModelPreset, layer: _Layer,
               num_tokens: int, result: BenchResult, flush: timing.L2Flusher | None) -> None:
    device, dtype = config.device, _DTYPES[config.dtype]
    e, h, k = preset.num_experts, preset.hidden_size, preset.top_k
    ceilings = result.ceilings
    act_bytes = torch.empty(0, dtype=dtype).element_size()
    sets = rotation_count(2 * num_tokens * h * act_bytes, ceilings.l2_bytes, config.rotate)
    gen = torch.Generator(device=device).manual_seed(config.seed + num_tokens)
    inputs = []
    for _ in range(sets):
        x = torch.randn(num_tokens, h, device=device, dtype=dtype, generator=gen)
        ids, scales = synthetic.make_routing(num_tokens, e, k, config.routing, gen)
        inputs.append((x, ids, scales))
    touched = statistics.fmean(count_touched_experts(ids, e) for _, ids, _ in inputs)
    common = {"preset_name": name, "preset": preset, "dtype": config.dtype,
              "num_tokens": num_tokens, "experts_touched": touched, "ceilings": ceilings,
              "act_bytes": act_bytes, "group_size": config.group_size,
              "asymmetric": config.asymmetric}
    output = torch.empty(num_tokens, h, device=device, dtype=dtype)
    w1, w2 = (layer.q1, layer.q2) if layer.q1 is not None else (layer.w1, layer.w2)
    dtypes = (dtype, layer.weight_type, dtype)
    runner = _ext.get_runner(*dtypes)
    workspace = torch.empty(max(1, int(runner.workspace_size(
        num_tokens, h, preset.inter_size, e, k,
        _ext.activation_to_enum(ActivationType.Swiglu)))), dtype=torch.uint8, device=device)
    tuner = autotuner.get_tuner()

    variants = {"tuned": [IMPL_TUNED], "default": [IMPL_DEFAULT],
                "both": [IMPL_TUNED, IMPL_DEFAULT]}[config.tactics]
    for impl in variants:
        forced = None
        if impl == IMPL_DEFAULT:
            forced = tactics.default_tactics(dtypes, ActivationType.Swiglu, device, num_tokens,
                                             k, e)

        def call(x: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                 forced: Sequence[str] | None = forced, pdl: bool = config.pdl) -> None:
            cutlass_fused_moe(x, ids, scales, w1, w2, dtype, output=output,
                              tune_max_num_tokens=config.max_tokens, tactics=forced,
                              workspace_buffer=workspace, enable_pdl=pdl,
                              **layer.clamp, **layer.quant)

        fns = [lambda s=s: call(*s) for s in inputs]
        fns[0]()  # resolves the tactics before any capture
        if forced is None:
            first, second = tuner.last_selection(1), tuner.last_selection(2)
            names = (first.tactic if first else "?", second.tactic if second else "?")
            source = "+".join(sorted({s.source for s in (first, second) if s is not None}))
        else:
            names, source = tuple(forced), "default"
        graphs: list[torch.cuda.CUDAGraph] = []
        if config.graph:
            pool = torch.cuda.graph_pool_handle()
            graphs = [timing.capture_graph(fn, pool) for fn in fns]
            timed = [g.replay for g in graphs]
        else:
            timed = fns
        latency = timing.time_us(timed, config.warmup, config.repeats, flush)
        result.rows.append(make_row(
            weights=config.weights, impl=impl, graph=config.graph, latency_us=latency,
            tactic1=names[0], tactic2=names[1], source=source or "?", **common))
        if config.stages:
            # Without PDL: a kernel launched early would count its wait for the one before.
            _stages(config, name, num_tokens, impl, lambda: call(*inputs[0], pdl=False), flush,
                    result)
        del graphs, timed

    activation = swiglu_fn(preset)
    for impl in config.peers:
        if impl == "reference" and num_tokens > REFERENCE_MAX_TOKENS:
            result.notes.append(f"{name} T={num_tokens}: reference skipped (above "
                                f"{REFERENCE_MAX_TOKENS} tokens)")
            continue
        if impl == "grouped_mm" and not grouped_mm_available():
            note = f"grouped_mm skipped: torch {torch.__version__} has no torch._grouped_mm"
            if note not in result.notes:
                result.notes.append(note)
            continue
        fns, note = _peer_calls(impl, inputs, layer, activation)
        if fns is None:
            result.notes.append(f"{name} T={num_tokens}: {note}")
            continue
        graph = False
        timed = fns
        if config.graph and impl == "grouped_mm":
            try:
                pool = torch.cuda.graph_pool_handle()
                graphs = [timing.capture_graph(fn, pool) for fn in fns]
                timed, graph = [g.replay for g in graphs], True
            except RuntimeError as exc:
                note = f"not capturable ({str(exc).splitlines()[0][:80]}); timed eagerly"
        warmup, repeats = _peer_repeats(impl, config.warmup, config.repeats)
        try:
            latency = timing.time_us(timed, warmup, repeats, flush)
        except RuntimeError as exc:  # out of memory, mostly: the other rows still count
            result.notes.append(f"{name} T={num_tokens}: {impl} failed while timed, skipped "
                                f"({str(exc).splitlines()[0][:120]})")
            continue
        result.rows.append(make_row(weights=config.dtype, impl=impl, graph=graph,
                                    latency_us=latency, note=note, **common))
        del timed
    torch.cuda.empty_cache()


def _peer_calls(impl: str, inputs: Sequence[tuple[torch.Tensor, ...]], layer: _Layer,
                activation: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[list[Callable[[], object]] | None, str]:
    """The peer's call per input set (run once to check it works), or None and why not."""
    w1, w2 = layer.w1, layer.w2
    if impl == "naive":
        fns = [lambda s=s: naive_moe(*s, w1, w2, activation) for s in inputs]
        note = "16-bit weights; host syncs per expert"
    elif impl == "reference":
        fns = [lambda s=s: reference_moe(*s, w1, w2, ActivationType.Swiglu, **layer.clamp)
               for s in inputs]
        note = "float32 compute, 16-bit weights"
    elif impl == "grouped_mm":
        w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
        errors = []
        for align in (1, 16):
            fns = [lambda s=s, a=align: grouped_mm_moe(*s, w1t, w2t, activation, a)
                   for s in inputs]
            try:
                fns[0]()
                torch.cuda.synchronize()
            except (RuntimeError, TypeError, ValueError) as exc:
                errors.append(f"align {align}: {str(exc).splitlines()[0][:120]}")
                continue
            return fns, "16-bit weights" + (f"; rows padded to {align}" if align > 1 else "")
        return None, "grouped_mm failed, skipped (" + "; ".join(errors) + ")"
    else:
        raise ValueError(f"unknown peer {impl!r} (known: {', '.join(PEERS)})")
    try:
        fns[0]()
        torch.cuda.synchronize()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        return None, f"{impl} failed, skipped ({str(exc).splitlines()[0][:120]})"
    return fns, note


def _stages(config: BenchConfig, name: str, num_tokens: int, impl: str,
            fn: Callable[[], object], flush: timing.L2Flusher | None, result: BenchResult
            ) -> None:
    try:
        kernels = profile_kernels(fn, STAGE_CALLS, flush)
    except (RuntimeError, ImportError) as exc:
        note = f"stage breakdown unavailable: {exc}"
        if note not in result.notes:
            result.notes.append(note)
        return
    totals, calls = assign_stages(kernels)
    result.stages += stage_rows(totals, calls, preset=name, dtype=config.dtype,
                                weights=config.weights, num_tokens=num_tokens, impl=impl)


# ------------------------------------------------------------------------------------------
# Output: table, CSV/JSON, plot
# ------------------------------------------------------------------------------------------


def _num(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%" if math.isfinite(value) else "-"


def format_bench_table(rows: Sequence[BenchRow]) -> str:
    """The text table of ``cutlass-moe bench``: one line per row."""
    headers = ["model", "T", "impl", "graph", "latency_us", "TB/s", "TFLOP/s", "floor_us",
               "mem", "compute", "roofline", "tactics (GEMM1 / GEMM2)", "note"]
    lines = []
    for r in rows:
        tactics = f"{r.tactic1} / {r.tactic2} ({r.source})" if r.tactic1 else ""
        lines.append([r.preset, str(r.num_tokens), r.impl, "yes" if r.graph else "no",
                      _num(r.latency_us), _num(r.tb_s, 2), _num(r.tflops, 2),
                      _num(r.mem_floor_us), _pct(r.mem_fraction), _pct(r.compute_fraction),
                      _pct(r.roofline_fraction), tactics, r.note])
    return format_table(headers, lines, left=(0, 2, 11, 12))


def format_stage_table(stages: Sequence[StageRow]) -> str:
    """One line per (model, T, impl): us per call of each stage, kernels per call."""
    grouped: dict[tuple[str, int, str], dict[str, StageRow]] = {}
    for s in stages:
        grouped.setdefault((s.preset, s.num_tokens, s.impl), {})[s.stage] = s
    headers = ["model", "T", "impl", *(f"{stage}_us" for stage in STAGES), "kernels_us",
               "launches"]
    lines = []
    for (preset, num_tokens, impl), by_stage in grouped.items():
        cells = [preset, str(num_tokens), impl]
        cells += [_num(by_stage[st].us_per_call) if st in by_stage else "-" for st in STAGES]
        cells.append(_num(sum(s.us_per_call for s in by_stage.values())))
        cells.append(_num(sum(s.launches_per_call for s in by_stage.values()), 0))
        lines.append(cells)
    return format_table(headers, lines, left=(0, 2))


def format_ceilings(ceilings: Ceilings) -> str:
    """One line naming the ceilings the fractions use."""
    sm80 = f"{_num(ceilings.sm80_tflops)} TFLOP/s"
    if ceilings.sm80_tactic:
        sm80 += f" ({ceilings.sm80_tactic})"
    return (f"ceilings on {ceilings.device}: copy {_num(ceilings.copy_tb_s, 2)} TB/s, "
            f"CUTLASS Sm80 {ceilings.dtype} GEMM {sm80} (compute fraction), cuBLAS "
            f"{_num(ceilings.cublas_tflops)} TFLOP/s (for reference), L2 "
            f"{ceilings.l2_bytes / 2**20:.0f} MiB")


def _json_dict(obj: Any) -> dict[str, Any]:
    return {k: finite_or_none(v) for k, v in dataclasses.asdict(obj).items()}


def result_json(result: BenchResult, config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document of a run: config, ceilings, rows, stages, notes."""
    return {"config": dict(config), "ceilings": _json_dict(result.ceilings),
            "rows": [_json_dict(r) for r in result.rows],
            "stages": [_json_dict(s) for s in result.stages], "notes": list(result.notes)}


def stages_csv_path(path: Path) -> Path:
    """Where the stage rows go next to a CSV: ``x.csv`` -> ``x.stages.csv``."""
    return path.with_name(f"{path.stem}.stages{path.suffix}")


def _write_csv(path: Path, rows: Sequence[Any], cls: type, extra: Mapping[str, Any]) -> None:
    with open(path, "w", newline="") as f:
        fields = [*(f.name for f in dataclasses.fields(cls)), *extra]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**dataclasses.asdict(row), **extra})


def write_bench_rows(path: Path, result: BenchResult, config: Mapping[str, Any]) -> list[Path]:
    """Writes the run as JSON (:func:`result_json`) or CSV (one line per row; the ceilings and
    scalar config values repeated as columns; stage rows to :func:`stages_csv_path`), by
    ``path``'s suffix. Returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        with open(path, "w") as f:
            json.dump(result_json(result, config), f, indent=2)
            f.write("\n")
        return [path]
    c = result.ceilings
    extra = {key: value for key, value in config.items()
             if isinstance(value, (str, int, float, bool)) and key not in ("dtype", "weights")}
    extra.update({"copy_tb_s": c.copy_tb_s, "sm80_tflops": c.sm80_tflops,
                  "cublas_tflops": c.cublas_tflops, "device": c.device})
    _write_csv(path, result.rows, BenchRow, extra)
    written = [path]
    if result.stages:
        _write_csv(stages_csv_path(path), result.stages, StageRow, {})
        written.append(stages_csv_path(path))
    return written


def plot_bench_rows(path: Path, rows: Sequence[BenchRow], ceilings: Ceilings | None,
                    title: str) -> None:
    """One column per preset: latency over T (log-log) per implementation with the memory
    floor, and below it the roofline fraction over T. Needs matplotlib."""
    import matplotlib  # optional dependency: imported only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r.preset for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    colors = {impl: f"C{index % 10}" for index, impl in enumerate(impls)}
    fig, axes = plt.subplots(2, max(1, len(presets)), figsize=(4.5 * max(1, len(presets)), 7.5),
                             squeeze=False)
    for column, preset in enumerate(presets):
        top, bottom = axes[0][column], axes[1][column]
        mine = [r for r in rows if r.preset == preset]
        for impl in dict.fromkeys(r.impl for r in mine):
            series = sorted((r for r in mine if r.impl == impl), key=lambda r: r.num_tokens)
            label = impl + (" (graph)" if any(r.graph for r in series) else "")
            tokens = [r.num_tokens for r in series]
            style = {"marker": "o", "label": label, "color": colors[impl]}
            top.plot(tokens, [r.latency_us for r in series], **style)
            bottom.plot(tokens, [r.roofline_fraction for r in series], **style)
        floor: dict[int, float] = {}
        for r in mine:
            if r.impl in (IMPL_TUNED, IMPL_DEFAULT) or r.num_tokens not in floor:
                floor[r.num_tokens] = r.mem_floor_us
        if floor:
            tokens = sorted(floor)
            top.plot(tokens, [floor[t] for t in tokens], linestyle="--", color="black",
                     label="memory floor")
        top.set_title(preset)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens (T)")
            ax.grid(True, which="both", alpha=0.3)
        top.set_yscale("log")
        top.set_ylabel("latency (us, median)")
        bottom.set_ylabel("roofline fraction (max of mem, compute)")
        fractions = [r.roofline_fraction for r in mine if math.isfinite(r.roofline_fraction)]
        bottom.set_ylim(0, max([1.05, *(1.05 * f for f in fractions)]))
        top.legend(fontsize="x-small")
    text = title + (f"; {format_ceilings(ceilings)}" if ceilings is not None else "")
    width = max(60, 30 * max(1, len(presets)))
    fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
