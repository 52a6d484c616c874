"""Tactic choice: which compiled kernels may serve a GEMM, and the heuristic default among them.

One rule decides the candidates of a GEMM — :func:`candidates`: the tactics compiled for the
call's dtypes that this device can run, that serve the call's activation (fused gated GEMM1
tactics only serve gated activations) and, for GEMM2 tactics split over K, only calls of at most
``SPLIT_K_MAX_ROWS`` expanded rows ``T*k``. The op, the AutoTuner, ``cutlass-moe tune`` and the
benchmark all take their candidates from it. :func:`default_tactic` picks among candidates from
measured tables (see docs/architecture.md, "Tactics"); :func:`resolve` checks a forced name.

Descriptors come from :func:`cutlass_moe._ext.tactics` (dicts with name, tile_m, tile_n,
stages, runnable, gated, split_k and, for gated tactics, ``activations``: a frozenset of
:class:`~cutlass_moe.activation.ActivationType`). Results are cached per extension generation.

int4 group-wise weights have their own runner (weight type ``"int4"``) whose descriptors carry
``weight_dtype`` "int4": tensor-core tactics ``sm80_<act>_int4_m..n..k64_w..._s<stages>``, the
weight-streaming ``sm80_decode[_gated]_<act>_int4_...`` ones and the tensor-core decode ones
``sm80_decode_mma[_gated]_<act>_int4_...``. One kernel serves every group size, so the group size
is not part of a tactic; it is part of the tuner's key. Their default table is
:data:`DEFAULT_TABLE_INT4`.

FP8 (e4m3) and MXFP4 weight-only weights, the other two formats of the group-scaled mainloop,
have their own runners too (weight types ``"fp8"`` and ``"mxfp4"``; descriptors'
``weight_dtype`` "fp8" / "mxfp4"): tensor-core tactics ``sm80_<act>_fp8_m..n..k64_w..._s<stages>``
and ``sm80_<act>_mxfp4_...`` on int4's tiles (no split-K or fused gated tactics), and
weight-streaming ``sm80_decode[_gated]_<act>_fp8|mxfp4_...`` tactics. Their default tables are
:data:`DEFAULT_TABLE_FP8` and :data:`DEFAULT_TABLE_MXFP4`.

Decode tactics (descriptors' ``decode`` true) of these three group-scaled formats are tuner
candidates by default and, up to half a row per expert, the weight-streaming ones that
:data:`DEFAULT_DECODE` names are the measured defaults (the tensor-core int4 decode tactics are
candidates only); those of 16-bit and int8 weights (within a few per cent of the tensor-core
tiles) are candidates only with ``CUTLASS_MOE_DECODE_TACTICS=1`` and never a default
(:data:`DECODE_ENV`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _ext
from .activation import ActivationType

#: (activation, weight, output) types of one ``MoeRunner``: the weight is a dtype, or a weight
#: format's tag (``"int4"``, ``"fp8"``, ``"mxfp4"``; see :mod:`cutlass_moe._ext`).
Dtypes = tuple[torch.dtype, torch.dtype | str, torch.dtype]

# The heuristic default: (largest expected rows per expert, preferred tile_m, tile_n, stages).
# Measured with `cutlass-moe tune` on an H100 running the Sm80 kernels (Mixtral-8x7B and
# Qwen3-30B-A3B shapes, bf16): up to 8 rows the weight stream dominates and 16-row tiles with a
# deep pipeline win; from 16 rows, 16-row tiles lose 13-32 % to 32/64-row tiles; past ~48 rows
# the 128x128 tile wins, with 3 stages (98 KB, two blocks per SM where the device allows)
# beating 4 (1.1-1.6x at 64-2048 rows).
DEFAULT_TABLE = (
    (8.0, 16, 128, 5),
    (16.0, 32, 128, 3),
    (48.0, 64, 128, 5),
    (math.inf, 128, 128, 3),
)
# int8 weights (W8A16), measured the same way: the upcast makes 32-row tiles the better choice
# up to 64 rows (1.3-1.46x over 64/128-row tiles on Qwen3 shapes), beyond which the 128x256
# tile is fastest for GEMM1 at every bucket of both models.
DEFAULT_TABLE_INT8 = (
    (8.0, 16, 128, 4),
    (64.0, 32, 128, 3),
    (math.inf, 128, 256, 3),
)
# int4 group-wise weights (W4A16): tensor-core tactics dequantising in the mainloop (no split-K,
# no fused gated tactics). Chosen by the int8 table's reasoning, which carries over with half the
# weight bytes: up to 8 rows per expert the weight stream dominates (the small-M 16x128 tile, 4
# stages: also the fast build's), up to 64 the 32-row tile, then the 128x128 prefill tile (3
# stages, 79 KB: fits sm_86/89; the fast build's other tactic); on an H200 the tuner picked the
# first row's tactic for Qwen3-30B-A3B at 8 and 64 tokens (tools/PERF_NOTES.md, change 6), and
# measured again there (Sm80 kernels, each GEMM alone with the L2 flushed, `cutlass-moe tune` up
# to 64 tokens) the 16x128 tile won GEMM1 from 1 row per expert on Mixtral-8x7B, Qwen3-30B-A3B
# and gpt-oss-20b. Up to half a row per expert the decode tactic of DEFAULT_DECODE comes first
# where the build has it (measured: see there). Where a build lacks a row's exact tactic,
# default_tactic takes the nearest tile_m.
DEFAULT_TABLE_INT4 = (
    (8.0, 16, 128, 4),
    (64.0, 32, 128, 4),
    (math.inf, 128, 128, 3),
)
# FP8 (e4m3) and MXFP4 weight-only weights run the int4 family's group-scaled mainloop on the
# same tiles (16x64 s4, 16x128 s4/s6, 32x128 s4, 64x128 s3/s4, 128x128 s3, 128x256 s3; the fast
# build has 16x128 s4 and 128x128 s3) and start from int4's table, bar its first row: on an
# H200 (Sm80 kernels, each GEMM alone with the L2 flushed, Mixtral-8x7B, Qwen3-30B-A3B and
# gpt-oss-20b at T=1, 8, 32, 64) the narrower 16x64 tile (twice the blocks of 16x128) is as fast
# or faster up to 8 rows per expert (gpt-oss-20b T=8 mxfp4, GEMM1/GEMM2: 192/100 us against
# 205/135 us; Mixtral-8x7B fp8 equal), and it measured within 1 % of the tuner's pick from 1 to
# 8 rows per expert on Mixtral-8x7B and gpt-oss-20b. Up to half a row per expert the decode
# tactics of DEFAULT_DECODE come first where the build has them.
DEFAULT_TABLE_FP8 = (
    (8.0, 16, 64, 4),
    (64.0, 32, 128, 4),
    (math.inf, 128, 128, 3),
)
DEFAULT_TABLE_MXFP4 = DEFAULT_TABLE_FP8
# Measured decode defaults of the group-scaled weight formats: per weight_dtype, (largest expected
# rows per expert, tactic names with the activation tag as "{act}"); the first row whose bound
# is at or above the rows applies, and its first name among the call's candidates wins (a gated
# name is only among a gated activation's GEMM1 candidates, so GEMM2 and ungated GEMM1s take the
# plain one). Where none is a candidate (decode tactics turned off with
# CUTLASS_MOE_DECODE_TACTICS=0, or the fast build, whose only named one is fp8's m2n8), and
# above the last bound, the weight type's table applies. Each row is what `cutlass-moe tune`
# picked on an H200 (Sm80 kernels, each GEMM alone with the L2 flushed, up to 64 tokens;
# Mixtral-8x7B E=8 k=2, Qwen3-30B-A3B E=128 k=8, gpt-oss-20b E=32 k=4); times are GEMM1/GEMM2:
# - int4, up to half a row: the FMA decode tactic m1n8 on both GEMMs, a gated GEMM1 included
#   (Mixtral-8x7B 0.25 and 0.5 rows: 96/52 and 172/90 us, against 221 us and more for the
#   tensor-core decode tactics on GEMM1; Qwen3-30B-A3B 0.0625 rows: gated m1n4 24.6 us, m1n8
#   22.7 us). From 1 row the int4 table's 16x128 tile wins GEMM1 everywhere. Mixtral-8x7B
#   tuned against the former tensor-core decode defaults: T=1 148 us against 339 us, T=32 642
#   against 2312 us.
# - fp8, up to a quarter row: gated m1n4 for a gated activation's GEMM1, else m1n8 (Mixtral-8x7B
#   0.25 rows: 128/77.5 us); up to half a row: m2n8 on both GEMMs (Mixtral-8x7B 0.5 rows:
#   221/122 us, 1.07x/1.70x over the 16x64 tile).
# - mxfp4, up to half a row: m1n8 on both GEMMs (Mixtral-8x7B 0.25/0.5 rows: 116/65 and
#   209/109 us, 1.31x over the 16x64 tile at 0.5; gpt-oss-20b 0.125 rows: 55/33 us).
# The tensor-core int4 decode kernels (sm80_decode_mma*) measured 1.2-1.6x faster than the FMA
# decode tactics and the tiles at 1-8 rows per expert in an earlier version, which loaded the
# activations with the weights; the version in this build reads the activations only when it
# multiplies (two serialised latencies per batch) and lost that, measuring 2-3x slower than the
# FMA decode tactics and the tiles. They stay tuner candidates only. 16-bit and int8 weights
# have no entry: their decode tactics are within a few per cent of the tiles.
DEFAULT_DECODE: dict[str, tuple[tuple[float, tuple[str, ...]], ...]] = {
    "int4": (
        (0.5, ("sm80_decode_{act}_int4_m1n8_c2x4_u4",)),
    ),
    "fp8": (
        (0.25, ("sm80_decode_gated_{act}_fp8_m1n4_c1x4_u4",
                "sm80_decode_{act}_fp8_m1n8_c2x4_u4")),
        (0.5, ("sm80_decode_{act}_fp8_m2n8_c2x4_u4",)),
    ),
    "mxfp4": (
        (0.5, ("sm80_decode_{act}_mxfp4_m1n8_c2x4_u4",)),
    ),
}
# Fused gated GEMM1 tactics (gather + both halves + activation in one kernel; tile N counts
# output columns), the default GEMM1 of a gated activation up to GATED_DEFAULT_MAX_ROWS rows per
# expert. Measured on the five presets (H100, bf16, GEMM1 + activation kernel against the fused
# kernel): up to 16 rows the two are within 0.95-1.05x of each other and the fused call also
# saves the gather and activation launches; from 32 rows the plain GEMM1 (64x64 warp tiles)
# wins by 2-19 %, the dual-accumulator kernel being limited to 64x32 warp tiles.
DEFAULT_TABLE_GATED = (
    (8.0, 16, 64, 5),
    (16.0, 32, 64, 4),
)
GATED_DEFAULT_MAX_ROWS = DEFAULT_TABLE_GATED[-1][0]
#: The default table of each quantised weight type (descriptors' ``weight_dtype``).
_WEIGHT_TABLES = {"int8": DEFAULT_TABLE_INT8, "int4": DEFAULT_TABLE_INT4,
                  "fp8": DEFAULT_TABLE_FP8, "mxfp4": DEFAULT_TABLE_MXFP4}


def supports_activation(desc: Mapping[str, Any], activation: ActivationType) -> bool:
    """Whether a tactic descriptor can run with ``activation``: a descriptor without an
    ``activations`` entry runs with any; a fused gated GEMM1 tactic lists the ones it fuses."""
    allowed = desc.get("activations")
    return allowed is None or activation in allowed


def split_k_max_rows() -> int:
    """Expanded rows (``T*k``) up to which GEMM2 tactics split over K may run."""
    return int(getattr(_ext.load_extension(), "SPLIT_K_MAX_ROWS", 0))


def serves_rows(desc: Mapping[str, Any], expanded_rows: int | None) -> bool:
    """Whether a tactic may run a call of ``expanded_rows`` rows ``T*k`` (None: any call that
    some row count allows, i.e. every tactic)."""
    if int(desc.get("split_k", 1)) == 1 or expanded_rows is None:
        return True
    return expanded_rows <= split_k_max_rows()


#: Environment variable that says which decode tactics (descriptors' ``decode`` true:
#: ``sm80_decode*``) are tuner candidates: unset, empty or ``auto``, those of the group-scaled weight
#: formats (:data:`AUTO_DECODE_WEIGHTS`, of which those that :data:`DEFAULT_DECODE` names are
#: also the defaults up to half a row per expert); ``1``/``true``/``yes``/``on``, every one (16-bit and int8 weights'
#: too); ``0``/``false``/``no``/``off``, none (and no decode default). A call that names one in
#: ``tactics=`` runs it whatever the setting.
DECODE_ENV = "CUTLASS_MOE_DECODE_TACTICS"
#: Weight types (descriptors' ``weight_dtype``) whose decode tactics are candidates by default.
AUTO_DECODE_WEIGHTS = frozenset({"int4", "fp8", "mxfp4"})
#: The decode modes of :data:`DECODE_ENV`'s values (lower case, stripped).
_DECODE_MODES = {"": "auto", "auto": "auto", "1": "all", "true": "all", "yes": "all", "on": "all",
                 "0": "none", "false": "none", "no": "none", "off": "none"}


def decode_mode() -> str:
    """Which decode tactics are tuner candidates, from :data:`DECODE_ENV`: ``"auto"`` (unset,
    empty or ``auto``: those of :data:`AUTO_DECODE_WEIGHTS`), ``"all"`` or ``"none"``; ValueError for any
    other value."""
    raw = os.environ.get(DECODE_ENV, "")
    mode = _DECODE_MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(
            f"{DECODE_ENV}={raw!r} is not a valid setting: leave it unset, empty or auto (decode "
            f"tactics of int4, fp8 and mxfp4 weights), or set 1/true/yes/on (every decode "
            f"tactic) or 0/false/no/off (none)")
    return mode


def decode_enabled() -> bool:
    """Whether every decode tactic is a tuner candidate (``CUTLASS_MOE_DECODE_TACTICS=1``)."""
    return decode_mode() == "all"


def _decode_allowed(desc: Mapping[str, Any], mode: str) -> bool:
    """Whether a descriptor passes the decode mode (tactics that are no decode tactic always do)."""
    if not desc.get("decode") or mode == "all":
        return True
    return mode == "auto" and desc.get("weight_dtype") in AUTO_DECODE_WEIGHTS


def _mode(include_decode: bool | None) -> str:
    """The decode mode of a candidates call: the argument's when given, else the environment's."""
    if include_decode is None:
        return decode_mode()
    return "all" if include_decode else "none"


# (descriptors, names) per candidate set: both are on every call's path (the tuner checks a
# cached tactic against the names), so neither is rebuilt per call.
_candidates: dict[tuple[Any, ...], tuple[list[dict[str, Any]], list[str]]] = {}


def _candidate_set(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expanded_rows: int | None,
    mode: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    split_ok = expanded_rows is None or expanded_rows <= split_k_max_rows()
    key = (_ext.generation(), dtypes, gemm, activation, device, split_ok, mode)
    found = _candidates.get(key)
    if found is None:
        descs = [
            d for d in _ext.tactics(*dtypes, gemm, device)
            if d.get("runnable", True) and supports_activation(d, activation)
            and (split_ok or int(d.get("split_k", 1)) == 1)
            and _decode_allowed(d, mode)
        ]
        found = _candidates[key] = (descs, [str(d["name"]) for d in descs])
    return found


def candidates(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expanded_rows: int | None = None,
    include_decode: bool | None = None,
) -> list[dict[str, Any]]:
    """Descriptors of the tactics that can serve GEMM ``gemm`` (1 or 2) of a call with these
    dtypes and ``activation`` on ``device``: runnable there, serving the activation, and (when
    ``expanded_rows`` is given) allowed at that many rows ``T*k``. Decode tactics: every one
    when ``include_decode`` is true, none when it is false, and by default as
    :func:`decode_mode` says. Cached; do not mutate."""
    return _candidate_set(dtypes, gemm, activation, device, expanded_rows,
                          _mode(include_decode))[0]


def candidate_names(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expanded_rows: int | None = None,
    include_decode: bool | None = None,
) -> list[str]:
    """Names of :func:`candidates` (cached; do not mutate)."""
    return _candidate_set(dtypes, gemm, activation, device, expanded_rows,
                          _mode(include_decode))[1]


def _table(descs: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, int, int, int], ...]:
    """The measured table for the descriptors' kind (fused gated, int8, int4, fp8, mxfp4 or
    16-bit)."""
    if any(d.get("gated") for d in descs):
        return DEFAULT_TABLE_GATED
    for weight_dtype, table in _WEIGHT_TABLES.items():
        if any(d.get("weight_dtype") == weight_dtype for d in descs):
            return table
    return DEFAULT_TABLE


#: The activation tags that DEFAULT_DECODE's names take in place of ``{act}``.
_ACT_TAGS = ("bf16", "fp16")


def _decode_default(pool: Sequence[Mapping[str, Any]], rows: float) -> str | None:
    """The first name of the :data:`DEFAULT_DECODE` row for ``rows`` that is among ``pool``
    (None without such a row or name)."""
    weight = next((d.get("weight_dtype") for d in pool if d.get("weight_dtype") in DEFAULT_DECODE),
                  None)
    if weight is None:
        return None
    row = next((row for row in DEFAULT_DECODE[weight] if rows <= row[0]), None)
    if row is None:
        return None
    names = {str(d["name"]) for d in pool}
    for template in row[1]:
        for act in _ACT_TAGS:
            name = template.format(act=act)
            if name in names:
                return name
    return None


def default_tactic(descs: Sequence[Mapping[str, Any]], expected_rows_per_expert: float) -> str:
    """Name of the heuristic default tactic among ``descs`` for a GEMM whose experts are
    expected to get ``expected_rows_per_expert`` rows (``T*k/E_total`` for balanced routing).

    Descriptors with ``runnable`` false are skipped, and so are GEMM2 tactics split over K and
    the architecture-specific tactics (``required_cc`` set: the Hopper ``sm90_*`` ones of a
    ``CUTLASS_MOE_SM90_TACTICS=ON`` build, not yet verified on a GPU; the tuner may pick them).
    For the group-scaled weight formats (``weight_dtype`` "int4", "fp8", "mxfp4") at decode
    sizes, the measured decode tactics of :data:`DEFAULT_DECODE` come first: the first name of
    the row for these rows that is among ``descs``. Otherwise (other weight types, larger
    calls, or none of the row's names present) the weight-streaming decode tactics are skipped
    and the row count selects a preferred configuration from a measured table
    (``DEFAULT_TABLE``; ``DEFAULT_TABLE_INT8`` / ``DEFAULT_TABLE_INT4`` / ``DEFAULT_TABLE_FP8``
    / ``DEFAULT_TABLE_MXFP4`` for descriptors whose ``weight_dtype`` is "int8" / "int4" /
    "fp8" / "mxfp4");
    when that exact tactic is not compiled or not runnable, the smallest ``tile_m`` at least the
    preferred one (else the largest) is taken, with more ``stages`` first, then the narrower
    ``tile_n``, then the name — so the choice never depends on the order of ``descs``.
    When fused gated GEMM1 tactics are among them (a gated activation's GEMM1), only those are
    considered up to ``GATED_DEFAULT_MAX_ROWS`` rows per expert (with their own table), and only
    the others above it.
    """
    runnable = [d for d in descs if d.get("runnable", True) and int(d.get("split_k", 1)) == 1
                and not int(d.get("required_cc", 0) or 0)]
    rows = max(float(expected_rows_per_expert), 0.0)
    decode = _decode_default(runnable, rows)
    if decode is not None:
        return decode
    pool = [d for d in runnable if not d.get("decode")]
    if not pool:
        raise RuntimeError("no runnable tactic is compiled for this configuration and device")
    gated = [d for d in pool if d.get("gated")]
    plain = [d for d in pool if not d.get("gated")]
    if gated and (rows <= GATED_DEFAULT_MAX_ROWS or not plain):
        pool = gated
    elif gated:
        pool = plain
    table = _table(pool)
    _, tile_m, tile_n, stages = next((row for row in table if rows <= row[0]), table[-1])
    exact = sorted(
        str(d["name"]) for d in pool
        if (int(d["tile_m"]), int(d["tile_n"]), int(d["stages"])) == (tile_m, tile_n, stages)
    )
    if exact:
        return exact[0]
    tile_ms = {int(d["tile_m"]) for d in pool}
    fitting = [m for m in tile_ms if m >= tile_m]
    chosen_m = min(fitting) if fitting else max(tile_ms)
    same_m = [d for d in pool if int(d["tile_m"]) == chosen_m]
    best = min(same_m, key=lambda d: (-int(d["stages"]), int(d["tile_n"]), str(d["name"])))
    return str(best["name"])


def tile_m_target(expected_rows_per_expert: float) -> float:
    """The smallest row bound of any default table (:data:`DEFAULT_DECODE`'s rows included) at
    or above ``expected_rows_per_expert``: the only input of the heuristic that depends on the
    call, so default choices are cached per bound (every table is a step function over these
    bounds, so ``default_tactic`` gives the same answer for the bound as for the rows)."""
    rows = max(float(expected_rows_per_expert), 0.0)
    tables = (*DEFAULT_TABLE, *DEFAULT_TABLE_INT8, *DEFAULT_TABLE_INT4, *DEFAULT_TABLE_FP8,
              *DEFAULT_TABLE_MXFP4, *DEFAULT_TABLE_GATED,
              *(row for decode_rows in DEFAULT_DECODE.values() for row in decode_rows))
    return min(row[0] for row in tables if rows <= row[0])


_defaults: dict[tuple[Any, ...], str] = {}


def default_for(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expected_rows_per_expert: float,
) -> str:
    """The heuristic default tactic of one GEMM of a call among its :func:`candidates` (cached
    per row bound and decode mode)."""
    target = tile_m_target(expected_rows_per_expert)
    mode = decode_mode()
    key = (_ext.generation(), dtypes, gemm, activation, device, target, mode)
    name = _defaults.get(key)
    if name is None:
        name = default_tactic(_candidate_set(dtypes, gemm, activation, device, None, mode)[0],
                              target)
        _defaults[key] = name
    return name


def default_tactics(
    dtypes: Dtypes,
    activation: ActivationType,
    device: torch.device,
    num_tokens: int,
    top_k: int,
    num_experts_total: int,
) -> tuple[str, str]:
    """The heuristic default tactics of both GEMMs of a call with ``num_tokens`` tokens (what an
    untuned call runs); rows per expert are expected to be ``T*k/E_total``."""
    rows = num_tokens * top_k / max(num_experts_total, 1)
    return (default_for(dtypes, 1, activation, device, rows),
            default_for(dtypes, 2, activation, device, rows))


def resolve(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    name: str,
    expanded_rows: int,
) -> str:
    """``name`` after checking that it is a candidate of this GEMM for this call; ValueError
    listing the candidates otherwise."""
    names = candidate_names(dtypes, gemm, activation, device, expanded_rows, include_decode=True)
    if name in names:
        return name
    why = ""
    if name in candidate_names(dtypes, gemm, activation, device, include_decode=True):
        why = (f" (it splits GEMM2 over K, which runs only up to {split_k_max_rows()} expanded "
               f"rows T*k; this call has {expanded_rows})")
    raise ValueError(
        f"tactic {name!r} is not a runnable GEMM{gemm} tactic for dtypes "
        f"{tuple(str(d) for d in dtypes)} and activation {activation.name} on this device{why}; "
        f"available: {', '.join(names)}"
    )
