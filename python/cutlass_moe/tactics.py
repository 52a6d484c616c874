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
``weight_dtype`` "int4": tensor-core tactics ``sm80_<act>_int4_m..n..k64_w..._s<stages>`` and the
weight-streaming ``sm80_decode[_gated]_<act>_int4_...`` ones (opt-in as for every weight type:
:data:`DECODE_ENV`). One kernel serves every group size, so the group size is not part of a
tactic; it is part of the tuner's key. Their default table is :data:`DEFAULT_TABLE_INT4`.

FP8 (e4m3) and MXFP4 weight-only weights, the other two formats of the group-scaled mainloop,
have their own runners too (weight types ``"fp8"`` and ``"mxfp4"``; descriptors'
``weight_dtype`` "fp8" / "mxfp4"): tensor-core tactics ``sm80_<act>_fp8_m..n..k64_w..._s<stages>``
and ``sm80_<act>_mxfp4_...`` on int4's tiles (no split-K or fused gated tactics), and
weight-streaming ``sm80_decode[_gated]_<act>_fp8|mxfp4_...`` tactics, opt-in like every decode
tactic (:data:`DECODE_ENV`; never a default). Their default tables are
:data:`DEFAULT_TABLE_FP8` and :data:`DEFAULT_TABLE_MXFP4`.
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
# no fused gated tactics; the weight-streaming decode tactics stay opt-in). Chosen by the int8
# table's reasoning, which carries over with half the weight bytes; on an H200 the tuner picked
# the first row's tactic for Qwen3-30B-A3B at 8 and 64 tokens, the other rows are not yet
# measured (tools/PERF_NOTES.md, change 6) — up to 8 rows per expert the weight
# stream dominates (the small-M 16x128 tile, 4 stages: also the fast build's), up to 64 the
# 32-row tile, then the 128x128 prefill tile (3 stages, 79 KB: fits sm_86/89; the fast build's
# other tactic). Where a build lacks a row's exact tactic, default_tactic takes the nearest
# tile_m.
DEFAULT_TABLE_INT4 = (
    (8.0, 16, 128, 4),
    (64.0, 32, 128, 4),
    (math.inf, 128, 128, 3),
)
# FP8 (e4m3) and MXFP4 weight-only weights run the int4 family's group-scaled mainloop on the
# same tiles (16x64 s4, 16x128 s4/s6, 32x128 s4, 64x128 s3/s4, 128x128 s3, 128x256 s3; the fast
# build has 16x128 s4 and 128x128 s3); their decode tactics are opt-in and never a default,
# as for every weight type. Not yet measured: they start
# from the int4 table (fp8 streams twice int4's weight bytes, MXFP4 as many plus one byte of
# scale per 32 weights), to be revisited with `cutlass-moe tune --weights fp8|mxfp4` on a GPU.
DEFAULT_TABLE_FP8 = DEFAULT_TABLE_INT4
DEFAULT_TABLE_MXFP4 = DEFAULT_TABLE_INT4
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


#: Environment variable that makes the weight-streaming decode tactics (``sm80_decode*``)
#: candidates of the tuner. Until they are verified and measured on a GPU they are opt-in: by
#: default only a call that names one in ``tactics=`` runs it.
DECODE_ENV = "CUTLASS_MOE_DECODE_TACTICS"


def decode_enabled() -> bool:
    """Whether the decode tactics are tuner candidates (``CUTLASS_MOE_DECODE_TACTICS=1``)."""
    return os.environ.get(DECODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# (descriptors, names) per candidate set: both are on every call's path (the tuner checks a
# cached tactic against the names), so neither is rebuilt per call.
_candidates: dict[tuple[Any, ...], tuple[list[dict[str, Any]], list[str]]] = {}


def _candidate_set(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expanded_rows: int | None,
    include_decode: bool | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    split_ok = expanded_rows is None or expanded_rows <= split_k_max_rows()
    decode_ok = decode_enabled() if include_decode is None else include_decode
    key = (_ext.generation(), dtypes, gemm, activation, device, split_ok, decode_ok)
    found = _candidates.get(key)
    if found is None:
        descs = [
            d for d in _ext.tactics(*dtypes, gemm, device)
            if d.get("runnable", True) and supports_activation(d, activation)
            and (split_ok or int(d.get("split_k", 1)) == 1)
            and (decode_ok or not d.get("decode"))
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
    ``expanded_rows`` is given) allowed at that many rows ``T*k``. Decode tactics are included
    when ``include_decode`` is true (default: :func:`decode_enabled`). Cached; do not mutate."""
    return _candidate_set(dtypes, gemm, activation, device, expanded_rows, include_decode)[0]


def candidate_names(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expanded_rows: int | None = None,
    include_decode: bool | None = None,
) -> list[str]:
    """Names of :func:`candidates` (cached; do not mutate)."""
    return _candidate_set(dtypes, gemm, activation, device, expanded_rows, include_decode)[1]


def _table(descs: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, int, int, int], ...]:
    """The measured table for the descriptors' kind (fused gated, int8, int4, fp8, mxfp4 or
    16-bit)."""
    if any(d.get("gated") for d in descs):
        return DEFAULT_TABLE_GATED
    for weight_dtype, table in _WEIGHT_TABLES.items():
        if any(d.get("weight_dtype") == weight_dtype for d in descs):
            return table
    return DEFAULT_TABLE



def default_tactic(descs: Sequence[Mapping[str, Any]], expected_rows_per_expert: float) -> str:
    """Name of the heuristic default tactic among ``descs`` for a GEMM whose experts are
    expected to get ``expected_rows_per_expert`` rows (``T*k/E_total`` for balanced routing).

    The row count selects a preferred configuration from a measured table (``DEFAULT_TABLE``;
    ``DEFAULT_TABLE_INT8`` / ``DEFAULT_TABLE_INT4`` / ``DEFAULT_TABLE_FP8`` /
    ``DEFAULT_TABLE_MXFP4`` for descriptors whose ``weight_dtype`` is "int8" / "int4" / "fp8" /
    "mxfp4");
    when that exact tactic is not compiled or not runnable, the smallest ``tile_m`` at least the
    preferred one (else the largest) is taken, with more ``stages`` first, then the narrower
    ``tile_n``, then the name — so the choice never depends on the order of ``descs``.
    Descriptors with ``runnable`` false are skipped, and so are GEMM2 tactics split over K and
    the weight-streaming decode tactics (their speed depends on the shape more than a table can
    say: only the tuner picks them, by measurement).
    When fused gated GEMM1 tactics are among them (a gated activation's GEMM1), only those are
    considered up to ``GATED_DEFAULT_MAX_ROWS`` rows per expert (with their own table), and only
    the others above it.
    """
    pool = [d for d in descs if d.get("runnable", True) and int(d.get("split_k", 1)) == 1
            and not d.get("decode")]
    if not pool:
        raise RuntimeError("no runnable tactic is compiled for this configuration and device")
    rows = max(float(expected_rows_per_expert), 0.0)
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
    """The smallest row bound of any default table at or above ``expected_rows_per_expert``:
    the only input of the heuristic that depends on the call, so default choices are cached per
    bound (every table is a step function over these bounds, so ``default_tactic`` gives the
    same answer for the bound as for the rows)."""
    rows = max(float(expected_rows_per_expert), 0.0)
    tables = (*DEFAULT_TABLE, *DEFAULT_TABLE_INT8, *DEFAULT_TABLE_INT4, *DEFAULT_TABLE_FP8,
              *DEFAULT_TABLE_MXFP4, *DEFAULT_TABLE_GATED)
    return min(row[0] for row in tables if rows <= row[0])


_defaults: dict[tuple[Any, ...], str] = {}


def default_for(
    dtypes: Dtypes,
    gemm: int,
    activation: ActivationType,
    device: torch.device,
    expected_rows_per_expert: float,
) -> str:
    """The heuristic default tactic of one GEMM of a call (cached per row bound)."""
    target = tile_m_target(expected_rows_per_expert)
    key = (_ext.generation(), dtypes, gemm, activation, device, target)
    name = _defaults.get(key)
    if name is None:
        name = default_tactic(candidates(dtypes, gemm, activation, device), target)
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
