#!/usr/bin/env python3
"""Generate the grouped-GEMM instance files and the tactic registry.

Each tactic is one compiled CUTLASS configuration with a stable name such as
``sm80_bf16_bf16_m64n128k64_w32x64x64_s4`` (16-bit weights) or
``sm80_bf16_int8_m16n128k64_w16x32x64_s4`` (int8 weights, per-output-channel scales) or
``sm80_bf16_int4_m128n128k64_w64x64x64_s3`` (packed int4 weights, group-wise scales and optional
zero points, dequantised in the project's mainloop; one kernel serves every group size) or
``sm80_gated_bf16_bf16_m16n64k64_w16x32x64_s5`` (fused gated GEMM1: the tile's N counts output
columns, each of which reads one up and one gate weight row) or
``sm80_bf16_bf16_m16n64k64_w16x32x64_s4_splitk4`` (GEMM2 split over K into 4 fp32 partial sums,
for decode; the split factors of one tile share one compiled kernel with fp32 output) or
``sm80_decode_bf16_int8_m2n16_c4x4_u4`` / ``sm80_decode_gated_bf16_bf16_m1n8_c2x4_u4``
(weight-streaming decode kernels: up to 2 rows per expert per pass, 16 output columns per work
item from 4 warps of 4 columns, 4 K-steps of loads in flight; src/grouped_gemm/decode_gemm.cuh).
With ``--sm90`` (CMake option CUTLASS_MOE_SM90_TACTICS) the Hopper tactics are added, e.g.
``sm90_bf16_bf16_m128n128k64_c1x1_cooperative`` (CUTLASS 3.x TMA + wgmma grouped GEMM, 128x128x64
tile, 1x1 cluster, cooperative schedule; src/grouped_gemm/sm90_grouped_gemm.cuh), one per file
(``sm90_grouped_gemm_*.cu``, compiled for sm_90a only); without it the output is unchanged.
Instances
are grouped a few per translation unit: every TU pays a fixed front-end cost, so batching is
several times cheaper than one TU per tactic, while enough TUs remain to keep a parallel build
busy.

Usage (CMake runs this at configure time):
    generate_kernels.py --out-dir DIR [--fast] [--sm90] [--per-file N]  # writes files, prints them
    generate_kernels.py --list [--fast] [--sm90]                         # prints tactic names
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# dtype tag -> CUTLASS element type and the C++ DType enumerator.
DTYPES = {
    "fp16": ("cutlass::half_t", "DType::kFloat16"),
    "bf16": ("cutlass::bfloat16_t", "DType::kBFloat16"),
}

# Weight-only quantised weight tags -> the C++ DType enumerator. The weight tag of a 16-bit
# tactic is its activation tag.
QUANT_WEIGHT_DTYPES = {
    "int8": "DType::kInt8",
    "int4": "DType::kInt4",
    "fp8": "DType::kFp8E4m3",
    "mxfp4": "DType::kMxfp4",
}

# Weight formats of the group-scaled mainloop (src/grouped_gemm/sm80_grouped_gemm_group_scaled.cuh):
# every one is compiled for the same tiles (FULL_TILES_INT4 / FAST_TILES_INT4).
GROUP_SCALED_FORMATS = ("int4", "fp8", "mxfp4")

# The decode kernel's weight element type per weight tag (16-bit: the activation type).
DECODE_WEIGHT_TYPES = {
    "int8": "int8_t",
    "int4": "cutlass::uint4b_t",
    "fp8": "cutlass::float_e4m3_t",
    "mxfp4": "cutlass::float_e2m1_t",
}

# Kernel template header and class of each weight kind ("16bit": weights in the activation dtype).
KERNEL_TEMPLATES = {
    "decode": ("grouped_gemm/decode_gemm.cuh", "grouped_gemm::decode::DecodeGemm"),
    "decode_mma": ("grouped_gemm/decode_mma_gemm.cuh", "grouped_gemm::decode::DecodeMmaGemm"),
    "16bit": ("grouped_gemm/sm80_grouped_gemm.cuh", "grouped_gemm::Sm80GroupedGemm"),
    "int8": ("grouped_gemm/sm80_grouped_gemm_int8.cuh", "grouped_gemm::Sm80GroupedGemmInt8"),
    "int4": ("grouped_gemm/sm80_grouped_gemm_group_scaled.cuh", "grouped_gemm::Sm80GroupedGemmInt4"),
    "fp8": ("grouped_gemm/sm80_grouped_gemm_group_scaled.cuh", "grouped_gemm::Sm80GroupedGemmFp8"),
    "mxfp4": ("grouped_gemm/sm80_grouped_gemm_group_scaled.cuh",
              "grouped_gemm::Sm80GroupedGemmMxfp4"),
    "gated": ("grouped_gemm/sm80_grouped_gemm_gated.cuh", "grouped_gemm::Sm80GroupedGemmGated"),
}

GEMM1 = 1
GEMM2 = 2


@dataclasses.dataclass(frozen=True)
class Tactic:
    dtype: str
    tile_m: int
    tile_n: int
    tile_k: int
    warp_m: int
    warp_n: int
    warp_k: int
    stages: int
    gemms: int = GEMM1 | GEMM2
    weight: str | None = None  # a QUANT_WEIGHT_DTYPES tag; None: weights in the activation dtype
    gated: bool = False  # fused gated GEMM1 (16-bit weights, GEMM1 only)
    split_k: int = 1  # > 1: GEMM2 split over K, fp32 partial sums (GEMM2 only)
    decode: bool = False  # weight-streaming decode kernel: tile_m rows per pass, tile_n columns
    # per work item, warp_n columns per warp, stages = K-steps of loads issued together
    mma: bool = False  # tensor-core decode kernel (int4): tile_m rows (8 per MMA group), tile_n
    # columns per work item (16 per MMA row tile, 8 gated), warp_k warps splitting K, stages =
    # 128-long K chunks of loads in flight per warp
    prefetch: bool = False  # tensor-core decode: the next batch's weight loads issued early

    @property
    def weight_tag(self) -> str:
        return self.weight or self.dtype

    @property
    def kind(self) -> str:
        """Key of KERNEL_TEMPLATES."""
        if self.decode:
            return "decode_mma" if self.mma else "decode"
        if self.gated:
            return "gated"
        return self.weight or "16bit"

    @property
    def weight_enum(self) -> str:
        return QUANT_WEIGHT_DTYPES[self.weight] if self.weight else DTYPES[self.dtype][1]

    @property
    def base_name(self) -> str:
        if self.mma:
            prefix = "sm80_decode_mma_gated" if self.gated else "sm80_decode_mma"
            return (f"{prefix}_{self.dtype}_{self.weight_tag}_m{self.tile_m}n{self.tile_n}"
                    f"_k{self.warp_k}_u{self.stages}" + ("_p" if self.prefetch else ""))
        if self.decode:
            prefix = "sm80_decode_gated" if self.gated else "sm80_decode"
            return (f"{prefix}_{self.dtype}_{self.weight_tag}_m{self.tile_m}n{self.tile_n}"
                    f"_c{self.warp_n}x{self.warps}_u{self.stages}")
        prefix = "sm80_gated" if self.gated else "sm80"
        return (
            f"{prefix}_{self.dtype}_{self.weight_tag}_m{self.tile_m}n{self.tile_n}k{self.tile_k}"
            f"_w{self.warp_m}x{self.warp_n}x{self.warp_k}_s{self.stages}"
        )

    @property
    def name(self) -> str:
        return self.base_name + (f"_splitk{self.split_k}" if self.split_k > 1 else "")

    @property
    def symbol(self) -> str:
        return "kTactic_" + self.name

    @property
    def kernel_alias(self) -> str:
        """The compiled kernel: split factors of one tile share the fp32-output instance."""
        return "Kernel_" + self.base_name + ("_f32out" if self.split_k > 1 else "")

    @property
    def file_kind(self) -> str:
        """Instances of one file kind share a template header and are batched into files."""
        return self.kind + ("_splitk" if self.split_k > 1 else "")

    @property
    def warps(self) -> int:
        return (self.tile_m // self.warp_m) * (self.tile_n // self.warp_n)

    @property
    def threads(self) -> int:
        return 32 * self.warps


# (tile_m, tile_n, tile_k, warp_m, warp_n, warp_k, stages). K-tile 64 throughout: a 16-bit
# K-major K-tile of 128 does not compile with CUTLASS 4.2's Sm80 grouped kernel.
# Small-M tiles serve decode (few rows per expert), large ones prefill.
FULL_TILES_16BIT = [
    (16, 128, 64, 16, 32, 64, 3),
    (16, 128, 64, 16, 32, 64, 4),
    (16, 128, 64, 16, 32, 64, 5),
    # Two warps over 64 columns: twice the blocks of a 16x128 tile for decode GEMMs with few
    # output tiles (e.g. Mixtral's GEMM2 at T=1 has 64 blocks of 16x128 for 132 SMs).
    (16, 64, 64, 16, 32, 64, 4),
    (16, 64, 64, 16, 32, 64, 5),
    (16, 64, 64, 16, 32, 64, 6),
    (16, 256, 64, 16, 64, 64, 3),
    (16, 256, 64, 16, 64, 64, 4),
    (32, 128, 64, 32, 32, 64, 3),
    (32, 128, 64, 32, 32, 64, 4),
    (32, 128, 64, 32, 32, 64, 5),
    (64, 128, 64, 32, 64, 64, 3),
    (64, 128, 64, 32, 64, 64, 4),
    (64, 128, 64, 32, 64, 64, 5),
    (128, 128, 64, 64, 64, 64, 2),
    (128, 128, 64, 64, 64, 64, 3),
    (128, 128, 64, 64, 64, 64, 4),
    (128, 256, 64, 64, 64, 64, 3),
    (256, 128, 64, 64, 64, 64, 3),
]

# One decode and one prefill tactic per dtype; both fit 99 KB of shared memory (sm_86/89).
FAST_TILES_16BIT = [
    (16, 128, 64, 16, 32, 64, 4),
    (128, 128, 64, 64, 64, 64, 3),
]


# W8A16: 16-bit activations x int8 weights (K-contiguous, per-output-channel scales). K-tile 64:
# the 16-bit A operand's shared-memory layout caps it there (a K-tile of 128 fails a static
# assertion). An int8 B tile takes half the shared memory of a 16-bit one, so deeper pipelines
# fit; weight-only GEMMs are bandwidth-bound in decode, where small-M tiles with many stages keep
# the most weight bytes in flight. The upcast keeps int8 and converted 16-bit B fragments in
# registers, so a 64x64 warp tile with 128 threads reaches 255 registers and spills on sm_90:
# 128x128 uses eight 64x32 warps instead. sizeof(SharedStorage) in bytes (both dtypes):
#   16x128  s3/s4/s5/s6  30736/40976/51216/61456    16x256  s3/s4/s5  55312/73744/92176
#   32x128  s3/s4/s5     36880/49168/61456          64x128  s3/s4/s5  49168/65552/81936
#   128x128 s3/s4        73744/98320                128x256 s3        98320
#   256x128 s3           122896 (over the 99 KB of sm_86/89: filtered at run time there)
FULL_TILES_INT8 = [
    (16, 128, 64, 16, 32, 64, 3),
    (16, 128, 64, 16, 32, 64, 4),
    (16, 128, 64, 16, 32, 64, 5),
    (16, 128, 64, 16, 32, 64, 6),
    (16, 256, 64, 16, 64, 64, 3),
    (16, 256, 64, 16, 64, 64, 4),
    (16, 256, 64, 16, 64, 64, 5),
    (32, 128, 64, 32, 32, 64, 3),
    (32, 128, 64, 32, 32, 64, 4),
    (32, 128, 64, 32, 32, 64, 5),
    (64, 128, 64, 32, 64, 64, 3),
    (64, 128, 64, 32, 64, 64, 4),
    (64, 128, 64, 32, 64, 64, 5),
    (128, 128, 64, 64, 32, 64, 3),
    (128, 128, 64, 64, 32, 64, 4),
    (128, 256, 64, 64, 64, 64, 3),
    (256, 128, 64, 64, 64, 64, 3),
]

# One decode and one prefill tactic per activation dtype; both fit 99 KB (sm_86/89).
FAST_TILES_INT8 = [
    (16, 128, 64, 16, 32, 64, 4),
    (128, 128, 64, 64, 32, 64, 3),
]


# Group-scaled weights (W4A16 int4, FP8 e4m3, MXFP4): 16-bit activations x packed weights with
# group-wise scales, dequantised into a 16-bit shared-memory tile once per K-tile
# (src/grouped_gemm/sm80_grouped_gemm_group_scaled.cuh); the three formats share these tiles. Per
# stage: the A tile (TileM x 64 x 2 B), the packed tile (TileN x 32 B; fp8 64 B) and two rows of
# scales (int4: and of zero points); plus one dequantised tile (64 x TileN x 2 B). Warp tiles are
# plain 16-bit ones (no mixed-input fragments), so 64x64 warps fit the registers as for 16-bit
# weights. sizeof(SharedStorage) in KB, about (int4 / fp8):
#   16x64 s4 26/34    16x128 s4/s6 44/58, 60/82    32x128 s4 52/68    64x128 s3/s4 58/68, 70/84
#   128x128 s3 79/91    128x256 s3 110/134 (over the 99 KB of sm_86/89: filtered at run time)
FULL_TILES_INT4 = [
    (16, 64, 64, 16, 32, 64, 4),
    (16, 128, 64, 16, 32, 64, 4),
    (16, 128, 64, 16, 32, 64, 6),
    (32, 128, 64, 32, 32, 64, 4),
    (64, 128, 64, 32, 64, 64, 3),
    (64, 128, 64, 32, 64, 64, 4),
    (128, 128, 64, 64, 64, 64, 3),
    (128, 256, 64, 64, 64, 64, 3),
]

# One small-M and one prefill tactic per activation dtype; both fit 99 KB (sm_86/89).
FAST_TILES_INT4 = [
    (16, 128, 64, 16, 32, 64, 4),
    (128, 128, 64, 64, 64, 64, 3),
]


# Fused gated GEMM1 (16-bit weights): one A tile and two weight tiles (up and gate rows) per
# stage, two accumulators. Per stage (TileM + 2 TileN) * 64 * 2 bytes of shared memory, so the
# same output tile needs about twice the shared memory of an unfused one; and two accumulators
# per thread: warp tiles stay at or below 64x32 / 32x64 (a 64x64 warp tile would need 256
# accumulator registers). Tile N counts output columns, so a GEMM1 of I columns has I / TileN
# column tiles per expert (half an unfused GEMM1's 2I / TileN): narrow tiles keep decode grids
# wide enough to fill the GPU.
FULL_TILES_GATED = [
    (16, 32, 64, 16, 32, 64, 6),
    (16, 64, 64, 16, 32, 64, 4),
    (16, 64, 64, 16, 32, 64, 5),
    (16, 64, 64, 16, 32, 64, 6),
    (16, 128, 64, 16, 32, 64, 3),
    (16, 128, 64, 16, 32, 64, 4),
    (32, 64, 64, 32, 32, 64, 4),
    (32, 128, 64, 32, 32, 64, 3),
    (64, 64, 64, 32, 32, 64, 3),
    (64, 128, 64, 32, 64, 64, 3),
    (128, 64, 64, 64, 32, 64, 3),
    (128, 64, 64, 64, 32, 64, 4),
    (128, 128, 64, 64, 32, 64, 3),
]

# One gated tactic per dtype (72 KB: fits sm_86/89).
FAST_TILES_GATED = [
    (16, 64, 64, 16, 32, 64, 4),
]

# GEMM2 split over K (decode): each tile is compiled once with fp32 output and registered once
# per split factor (the runner cuts K into that many slices, E * splits problems, and finalize
# adds the partial sums in order). Few rows per expert, so 16- and 32-row tiles only; each slice
# walks K / splits, so deep pipelines buy little.
SPLIT_FACTORS = (2, 4, 8)
FULL_TILES_SPLITK_16BIT = [
    (16, 64, 64, 16, 32, 64, 4),
    (16, 128, 64, 16, 32, 64, 4),
    (32, 128, 64, 32, 32, 64, 4),
]
FAST_TILES_SPLITK_16BIT = [
    (16, 64, 64, 16, 32, 64, 4),
]
FULL_TILES_SPLITK_INT8 = [
    (16, 128, 64, 16, 32, 64, 4),
    (32, 128, 64, 32, 32, 64, 4),
]
FAST_TILES_SPLITK_INT8 = [
    (16, 128, 64, 16, 32, 64, 4),
]


# Weight-streaming decode kernels: (rows per pass, output columns per warp, warps, K-steps in
# flight), for 16-bit and int8 weights, plain (GEMM1 and GEMM2) and gated (GEMM1: up and gate
# rows per column, so half the columns per warp). A warp keeps columns x halves x K-steps
# 16-byte loads per lane in flight: 16 for every configuration, 8 KB per warp. More rows per
# pass re-read fewer weights when experts get several rows but cost registers (accumulators:
# columns x halves x rows per lane), so those take fewer K-steps.
FULL_DECODE = {
    ("16bit", False): [(1, 4, 4, 4), (2, 4, 4, 4), (4, 4, 4, 2), (8, 2, 4, 2)],
    ("16bit", True): [(1, 2, 4, 4), (2, 2, 4, 4), (4, 2, 4, 2), (8, 1, 4, 2)],
    ("int8", False): [(1, 2, 4, 4), (2, 2, 4, 4), (4, 2, 4, 2), (8, 1, 4, 2)],
    # 8 rows of int8 gated columns spill registers on sm_90 (both halves' 16-wide vectors):
    # not compiled.
    ("int8", True): [(1, 1, 4, 4), (2, 1, 4, 4), (4, 1, 4, 2)],
    # int4: 32 weights per 16-byte vector, converted 8 at a time, plus per-vector partial sums:
    # 4 rows of 2 columns spill on sm_90 and 8 rows on every arch (about 150 bytes), so 4 rows
    # take one column and 8 rows are not compiled.
    ("int4", False): [(1, 2, 4, 4), (2, 2, 4, 4), (4, 1, 4, 2)],
    ("int4", True): [(1, 1, 4, 4), (2, 1, 4, 4), (4, 1, 4, 2)],
    # fp8 (16 weights per vector) and mxfp4 (32): int4's shapes, bar 4 gated mxfp4 rows (255
    # registers and a 56-byte spill on sm_90).
    ("fp8", False): [(1, 2, 4, 4), (2, 2, 4, 4), (4, 1, 4, 2)],
    ("fp8", True): [(1, 1, 4, 4), (2, 1, 4, 4), (4, 1, 4, 2)],
    ("mxfp4", False): [(1, 2, 4, 4), (2, 2, 4, 4), (4, 1, 4, 2)],
    ("mxfp4", True): [(1, 1, 4, 4), (2, 1, 4, 4)],
}
FAST_DECODE = {kind: configs[1:2] for kind, configs in FULL_DECODE.items()}

# Tensor-core decode kernels for int4 weights (src/grouped_gemm/decode_mma_gemm.cuh): (rows per
# item: 8 per MMA group, MMA row tiles per item, warps splitting K, 128-long K chunks of loads in
# flight per warp, the next batch's loads issued early), plain and gated. Every warp keeps
# tiles x 2 x chunks 16-byte weight loads in flight (twice that with prefetch, at about 200
# registers: two blocks per SM instead of three).
FULL_DECODE_MMA = {
    False: [(8, 1, 4, 4, False), (8, 2, 4, 2, False), (16, 1, 4, 2, False), (16, 2, 4, 2, False),
            (8, 2, 4, 2, True), (16, 1, 4, 2, True)],
    True: [(8, 1, 4, 4, False), (8, 2, 4, 2, False), (16, 1, 4, 2, False), (8, 2, 4, 2, True)],
}
FAST_DECODE_MMA = {gated: configs[:1] for gated, configs in FULL_DECODE_MMA.items()}


def _decode_tactics(fast: bool) -> list[Tactic]:
    found = []
    for (weights, gated), configs in (FAST_DECODE if fast else FULL_DECODE).items():
        for dtype in DTYPES:
            for rows, cols, warps, unroll in configs:
                found.append(Tactic(
                    dtype, rows, cols * warps, 0, rows, cols, 0, unroll,
                    gemms=GEMM1 if gated else GEMM1 | GEMM2,
                    weight=None if weights == "16bit" else weights, gated=gated, decode=True))
    for gated, configs in (FAST_DECODE_MMA if fast else FULL_DECODE_MMA).items():
        for dtype in DTYPES:
            for rows, tiles, warps, unroll, prefetch in configs:
                cols = tiles * (8 if gated else 16)
                found.append(Tactic(
                    dtype, rows, cols, 0, rows, cols, warps, unroll,
                    gemms=GEMM1 if gated else GEMM1 | GEMM2, weight="int4", gated=gated,
                    decode=True, mma=True, prefetch=prefetch))
    return found


# Hopper tactics (sm_90a; src/grouped_gemm/sm90_grouped_gemm.cuh): CUTLASS 3.x grouped GEMM with
# TMA loads and stores, wgmma and a warp-specialized persistent kernel, 16-bit weights, plain
# epilogue (GEMM1 and GEMM2; a gated activation runs in the activation kernel after GEMM1).
# (tile_m, tile_n, tile_k, cluster_m, cluster_n, schedule): cooperative tiles (two consumer warp
# groups on one tile of at least 128 rows) for prefill, a ping-pong tile (the warp groups on
# alternate 64-row tiles) for fewer rows per expert; a 2x1 cluster multicasts each weight tile to
# two row tiles. Pipeline stages: as many as fit (CUTLASS's StageCountAutoCarveout). Compiled only
# with --sm90; about a minute and 3 GB of memory per instance, so one instance per file.
SM90_SCHEDULES = ("cooperative", "pingpong")
FULL_TILES_SM90 = [
    (128, 128, 64, 1, 1, "cooperative"),
    (128, 128, 64, 2, 1, "cooperative"),
    (128, 256, 64, 1, 1, "cooperative"),
    (64, 128, 64, 1, 1, "pingpong"),
]
FAST_TILES_SM90 = [
    (128, 128, 64, 1, 1, "cooperative"),
    (64, 128, 64, 1, 1, "pingpong"),
]
SM90_PER_FILE = 1
SM90_TEMPLATE = ("grouped_gemm/sm90_grouped_gemm.cuh", "grouped_gemm::Sm90GroupedGemm")


@dataclasses.dataclass(frozen=True)
class Sm90Tactic:
    """A Hopper (sm_90a) tactic: 16-bit weights in the activation dtype, both GEMMs."""

    dtype: str
    tile_m: int
    tile_n: int
    tile_k: int
    cluster_m: int
    cluster_n: int
    schedule: str  # an SM90_SCHEDULES entry
    gemms: int = GEMM1 | GEMM2
    required_cc: int = 90  # sm_90a code: compute capability 9.0 only (GemmTactic::required_cc)

    def __post_init__(self) -> None:
        if self.schedule not in SM90_SCHEDULES:
            raise ValueError(f"unknown sm90 schedule {self.schedule!r}")
        if self.schedule == "cooperative" and self.tile_m < 128:
            raise ValueError("cooperative sm90 tiles need at least 128 rows")

    @property
    def weight_tag(self) -> str:
        return self.dtype

    @property
    def weight_enum(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def name(self) -> str:
        return (f"sm90_{self.dtype}_{self.weight_tag}_m{self.tile_m}n{self.tile_n}k{self.tile_k}"
                f"_c{self.cluster_m}x{self.cluster_n}_{self.schedule}")

    @property
    def symbol(self) -> str:
        return "kTactic_" + self.name

    @property
    def kernel_alias(self) -> str:
        return "Kernel_" + self.name

    @property
    def file_kind(self) -> str:
        return "sm90"

    @property
    def warp_group_tile(self) -> tuple[int, int, int]:
        """One consumer warp group's tile (what the registry records as the warp tile): half the
        rows of a cooperative tile, a whole ping-pong tile."""
        rows = self.tile_m // 2 if self.schedule == "cooperative" else self.tile_m
        return rows, self.tile_n, self.tile_k


def sm90_tactics(fast: bool = False) -> list[Sm90Tactic]:
    """The Hopper tactics that ``--sm90`` adds, in registry order."""
    tiles = FAST_TILES_SM90 if fast else FULL_TILES_SM90
    return [Sm90Tactic(dtype, *tile) for dtype in DTYPES for tile in tiles]


def tactics(fast: bool = False, sm90: bool = False) -> list[Tactic | Sm90Tactic]:
    """All tactics of a build, in registry order (the Hopper ones last, only with ``sm90``)."""
    if sm90:
        return [*tactics(fast), *sm90_tactics(fast)]
    tiles = FAST_TILES_16BIT if fast else FULL_TILES_16BIT
    tiles_int8 = FAST_TILES_INT8 if fast else FULL_TILES_INT8
    tiles_int4 = FAST_TILES_INT4 if fast else FULL_TILES_INT4
    tiles_gated = FAST_TILES_GATED if fast else FULL_TILES_GATED
    tiles_split = FAST_TILES_SPLITK_16BIT if fast else FULL_TILES_SPLITK_16BIT
    tiles_split_int8 = FAST_TILES_SPLITK_INT8 if fast else FULL_TILES_SPLITK_INT8
    return (
        [Tactic(dtype, *tile) for dtype in DTYPES for tile in tiles]
        + [Tactic(dtype, *tile, weight="int8") for dtype in DTYPES for tile in tiles_int8]
        + [
            Tactic(dtype, *tile, weight=fmt)
            for fmt in GROUP_SCALED_FORMATS
            for dtype in DTYPES
            for tile in tiles_int4
        ]
        + [Tactic(dtype, *tile, gemms=GEMM1, gated=True) for dtype in DTYPES for tile in tiles_gated]
        + [
            Tactic(dtype, *tile, gemms=GEMM2, split_k=splits)
            for dtype in DTYPES
            for tile in tiles_split
            for splits in SPLIT_FACTORS
        ]
        + [
            Tactic(dtype, *tile, gemms=GEMM2, weight="int8", split_k=splits)
            for dtype in DTYPES
            for tile in tiles_split_int8
            for splits in SPLIT_FACTORS
        ]
        + _decode_tactics(fast)
    )


def _cpp_bool(value: bool) -> str:
    return "true" if value else "false"


def _instance_file(group: list[Tactic]) -> str:
    # A group shares one activation dtype and one weight kind (see generate()).
    header, template = KERNEL_TEMPLATES[group[0].kind]
    lines = [
        "// Generated by tools/generate_kernels.py; do not edit.",
        f'#include "{header}"',
        "",
        "namespace cutlass_moe {",
        "namespace generated {",
        "",
    ]
    declared = set()
    for t in group:
        element, dtype_enum = DTYPES[t.dtype]
        kernel_name = t.kernel_alias
        if kernel_name not in declared:
            out = ", float" if t.split_k > 1 else ""
            if t.mma:
                kernel = (
                    f"{template}<{element}, {t.tile_m // 8}, {t.tile_n // (8 if t.gated else 16)}, "
                    f"{t.warp_k}, {t.stages}, {_cpp_bool(t.gated)}, {_cpp_bool(t.prefetch)}>"
                )
            elif t.decode:
                weight = DECODE_WEIGHT_TYPES[t.weight] if t.weight else element
                kernel = (
                    f"{template}<{element}, {weight}, {t.tile_m}, {t.warp_n}, {t.warps}, "
                    f"{t.stages}, {_cpp_bool(t.gated)}>"
                )
            else:
                kernel = (
                    f"{template}<{element}, {t.tile_m}, {t.tile_n}, {t.tile_k}, "
                    f"{t.warp_m}, {t.warp_n}, {t.warp_k}, {t.stages}{out}>"
                )
            lines.append(f"using {kernel_name} = {kernel};")
            declared.add(kernel_name)
        lines += [
            f"extern const GemmTactic {t.symbol} = {{",
            f'    "{t.name}", {dtype_enum}, {t.weight_enum},',
            f"    {t.tile_m}, {t.tile_n}, {t.tile_k}, {t.warp_m}, {t.warp_n}, {t.warp_k},",
            f"    {t.stages}, {kernel_name}::kThreads, {kernel_name}::kSmemBytes, {t.gemms},",
            f"    {_cpp_bool(t.gated)}, {t.split_k}, {_cpp_bool(t.decode)},",
            f"    &{kernel_name}::prepare, &{kernel_name}::launch}};",
            "",
        ]
    lines += ["}  // namespace generated", "}  // namespace cutlass_moe", ""]
    return "\n".join(lines)


def _sm90_instance_file(group: list[Sm90Tactic]) -> str:
    header, template = SM90_TEMPLATE
    lines = [
        "// Generated by tools/generate_kernels.py; do not edit.",
        "// sm_90a only (CMake option CUTLASS_MOE_SM90_TACTICS).",
        f'#include "{header}"',
        "",
        "namespace cutlass_moe {",
        "namespace generated {",
        "",
    ]
    for t in group:
        element, dtype_enum = DTYPES[t.dtype]
        kernel = t.kernel_alias
        pingpong = _cpp_bool(t.schedule == "pingpong")
        warp_m, warp_n, warp_k = t.warp_group_tile
        lines += [
            (f"using {kernel} = {template}<{element}, {t.tile_m}, {t.tile_n}, {t.tile_k}, "
             f"{t.cluster_m}, {t.cluster_n}, {pingpong}>;"),
            f"extern const GemmTactic {t.symbol} = {{",
            f'    "{t.name}", {dtype_enum}, {t.weight_enum},',
            f"    {t.tile_m}, {t.tile_n}, {t.tile_k}, {warp_m}, {warp_n}, {warp_k},",
            f"    {kernel}::kStages, {kernel}::kThreads, {kernel}::kSmemBytes, {t.gemms},",
            "    false, 1, false,",
            f"    &{kernel}::prepare, &{kernel}::launch,",
            f"    {t.required_cc}, &{kernel}::workspace_bytes}};",
            "",
        ]
    lines += ["}  // namespace generated", "}  // namespace cutlass_moe", ""]
    return "\n".join(lines)


def _registry_file(all_tactics: list[Tactic | Sm90Tactic]) -> str:
    lines = [
        "// Generated by tools/generate_kernels.py; do not edit.",
        '#include "cutlass_moe/tactic.h"',
        "",
        "namespace cutlass_moe {",
        "namespace generated {",
    ]
    lines += [f"extern const GemmTactic {t.symbol};" for t in all_tactics]
    lines += [
        "}  // namespace generated",
        "",
        "namespace {",
        "const GemmTactic* const kAllTactics[] = {",
    ]
    lines += [f"    &generated::{t.symbol}," for t in all_tactics]
    lines += [
        "};",
        "}  // namespace",
        "",
        "const GemmTactic* const* gemm_tactics(int* count) {",
        "  *count = static_cast<int>(sizeof(kAllTactics) / sizeof(kAllTactics[0]));",
        "  return kAllTactics;",
        "}",
        "",
        "}  // namespace cutlass_moe",
        "",
    ]
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their timestamps, so a reconfigure does not rebuild every instance.
    if path.exists() and path.read_text() == text:
        return
    path.write_text(text)


def generate(out_dir: Path, fast: bool, per_file: int, sm90: bool = False) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    all_tactics = tactics(fast, sm90)
    names = [t.name for t in all_tactics]
    if len(set(names)) != len(names):
        raise SystemExit("generate_kernels.py: duplicate tactic names")
    written = []
    file_kinds = list(dict.fromkeys(t.file_kind for t in all_tactics))
    for dtype in DTYPES:
        for file_kind in file_kinds:
            group_all = [t for t in all_tactics if t.dtype == dtype and t.file_kind == file_kind]
            # Batch by compiled kernel (a split tile's factors stay in one file).
            kernels = list(dict.fromkeys(t.kernel_alias for t in group_all))
            # 16-bit files keep their original names; others carry the weight tag.
            suffix = "" if file_kind == "16bit" else f"_{file_kind}"
            stem = f"sm80_grouped_gemm_{dtype}{suffix}"
            make = _instance_file
            batch_size = per_file
            if file_kind == "sm90":
                # Their own files (CMake compiles sm90_grouped_gemm_*.cu for sm_90a only).
                stem = f"sm90_grouped_gemm_{dtype}"
                make, batch_size = _sm90_instance_file, SM90_PER_FILE
            for index in range(0, len(kernels), batch_size):
                batch = set(kernels[index : index + batch_size])
                path = out_dir / f"{stem}_{index // batch_size}.cu"
                group = [t for t in group_all if t.kernel_alias in batch]
                _write_if_changed(path, make(group))
                written.append(path)
    registry = out_dir / "tactic_registry.cu"
    _write_if_changed(registry, _registry_file(all_tactics))
    written.append(registry)
    # Files from an earlier configuration with more tactics would otherwise linger unused.
    for stale in out_dir.glob("*.cu"):
        if stale not in written:
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="where to write the generated .cu files")
    parser.add_argument("--fast", action="store_true", help="one or two tactics per GEMM")
    parser.add_argument("--per-file", type=int, default=3, help="tactics per translation unit")
    parser.add_argument("--sm90", action="store_true",
                        help="add the Hopper (sm_90a) tactics, in sm90_grouped_gemm_*.cu files")
    parser.add_argument("--list", action="store_true", help="print tactic names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(t.name for t in tactics(args.fast, args.sm90)))
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required unless --list is given")
    if args.per_file < 1:
        parser.error("--per-file must be at least 1")
    files = generate(args.out_dir, args.fast, args.per_file, args.sm90)
    sys.stdout.write(";".join(str(p) for p in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
