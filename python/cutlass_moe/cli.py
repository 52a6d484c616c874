"""The ``cutlass-moe`` command line (also ``python -m cutlass_moe``).

    cutlass-moe info                      build, compiled archs, tactic counts, GPUs
    cutlass-moe tune  --model NAME ...    tune every token bucket of a layer shape, write the cache
    cutlass-moe bench --model NAME ...    time cutlass_fused_moe and its peers against the roofline

:func:`main` returns the exit status: 0 on success, 1 when the work itself failed (no tactic
ran, ...), 2 for usage errors and a missing GPU or extension, 130 when interrupted. User errors
are one ``cutlass-moe: error: ...`` line on stderr (with the usage for argument errors), never a
traceback. The command's results go to stdout; progress and diagnostics go to stderr.

This module parses and reports; the work lives elsewhere: what ``info`` reports in
:mod:`cutlass_moe.diagnostics`, tuning in :mod:`cutlass_moe.autotuner`, the benchmark in
:mod:`cutlass_moe.bench`. Only ``python -m cutlass_moe`` (``__main__``) imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from . import _ext, autotuner, bench, diagnostics, validation
from ._version import __version__
from .activation import ActivationType
from .presets import MODEL_PRESETS, ModelPreset
from .tables import format_table
from .tuning_cache import CACHE_ENV

logger = logging.getLogger("cutlass_moe.cli")

PROG = "cutlass-moe"
#: Where ``tune`` writes (and ``bench --tuned`` reads) when neither --out/--cache nor
#: ``$CUTLASS_MOE_TUNING_CACHE`` names a file.
DEFAULT_CACHE_FILE = "cutlass_moe_tuning_cache.json"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--weights`` accepts these; which ones a build can run is checked after parsing.
WEIGHT_CHOICES = ("bf16", "fp16", "int8", "int4", "fp8", "mxfp4")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing error: printed as ``cutlass-moe: error: <message>``, exit ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------
# Argument types (their messages are what the user sees after "argument --x:")
# ------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An integer >= 1 (``argparse`` type)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def token_counts(text: str) -> list[int]:
    """Comma-separated positive token counts, e.g. ``"1,8,32"`` (``argparse`` type)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        counts = [int(p) for p in parts]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive token counts such as 1,8,32, got {text!r}")
    return counts


def model_name(text: str) -> str:
    """A key of :data:`~cutlass_moe.presets.MODEL_PRESETS`, case-insensitive (``argparse``
    type); an unknown name lists the known ones and suggests the closest."""
    name = text.strip().lower()
    if name in MODEL_PRESETS:
        return name
    close = difflib.get_close_matches(name, list(MODEL_PRESETS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r} (known: {', '.join(MODEL_PRESETS)}){hint}")


def cuda_device(text: str) -> torch.device:
    """A CUDA device such as ``cuda`` or ``cuda:1`` (``argparse`` type)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise argparse.ArgumentTypeError(
            f"expected a CUDA device like cuda or cuda:1, got {text!r}")
    return device


# ------------------------------------------------------------------------------------------
# Shared checks
# ------------------------------------------------------------------------------------------

_SHAPE_OPTIONS = (("--experts", "num_experts"), ("--hidden", "hidden_size"),
                  ("--inter", "inter_size"), ("--top-k", "top_k"))


def resolve_shape(args: argparse.Namespace, parser: argparse.ArgumentParser
                  ) -> tuple[str, ModelPreset]:
    """The layer shape of ``--model`` or of the four explicit numbers, as ``(name, preset)``
    (name ``"custom"`` for numbers). Inconsistent options end in ``parser.error``."""
    given = {opt: getattr(args, field) for opt, field in _SHAPE_OPTIONS
             if getattr(args, field) is not None}
    if args.model is not None and given:
        parser.error(f"--model and {'/'.join(given)} are mutually exclusive: give a model "
                     "preset, or all four of --experts, --hidden, --inter and --top-k")
    if args.model is not None:
        name, preset = args.model, MODEL_PRESETS[args.model]
    else:
        missing = [opt for opt, _ in _SHAPE_OPTIONS if opt not in given]
        if len(missing) == len(_SHAPE_OPTIONS):
            parser.error("give a layer shape: --model NAME (one of "
                         f"{', '.join(MODEL_PRESETS)}) or --experts E --hidden H --inter I "
                         "--top-k K")
        if missing:
            parser.error("explicit shapes need all four of --experts, --hidden, --inter and "
                         f"--top-k (missing: {', '.join(missing)})")
        name = "custom"
        preset = ModelPreset(num_experts=args.num_experts, hidden_size=args.hidden_size,
                             inter_size=args.inter_size, top_k=args.top_k)
    problem = layer_shape_problem(preset, "16bit")
    if problem is not None:
        parser.error(problem)
    return name, preset


def _accepts(num_experts: int, hidden_size: int, inter_size: int, top_k: int,
             weights: str) -> bool:
    try:
        validation.check_layer_shape(num_experts, hidden_size, inter_size, top_k,
                                     weights=weights)
    except ValueError:
        return False
    return True


_WEIGHT_ALIGN = {"int8": (validation.INT8_ALIGN_ELEMS, "16-byte int8 weight rows"),
                 "int4": (validation.INT4_ALIGN_ELEMS, "16-byte loads of packed int4 weights"),
                 "fp8": (validation.FP8_ALIGN_ELEMS,
                         "32-element K slices of the group-scaled fp8 mainloop"),
                 "mxfp4": (validation.MXFP4_ALIGN_ELEMS, "16-byte loads of packed e2m1 weights")}
#: The ``--weights`` values with group-wise scales (``--group-size``).
GROUP_SCALED_WEIGHTS = bench.GROUP_SCALED_WEIGHTS


def layer_shape_problem(preset: ModelPreset, weights: str) -> str | None:
    """None when :func:`cutlass_moe.validation.check_layer_shape` accepts the layer with
    ``weights`` (``"16bit"``, ``"int8"``, ``"int4"``, ``"fp8"`` or ``"mxfp4"``), else what is
    wrong in terms of the
    command's options. The rule is validation's alone: the option at fault is found by asking
    it about the shape without ``--top-k`` (1) and with one expert."""
    e, h, i, k = preset.num_experts, preset.hidden_size, preset.inter_size, preset.top_k
    try:
        validation.check_layer_shape(e, h, i, k, weights=weights)
    except ValueError as exc:
        problem = str(exc)
    else:
        return None
    if not _accepts(1, h, i, 1, "16bit"):
        return (f"--hidden ({h}) and --inter ({i}) must be multiples of "
                f"{validation.ALIGN_ELEMS} (rows are read with 16-byte vector accesses)")
    if not _accepts(1, h, i, 1, weights):
        align, why = _WEIGHT_ALIGN[weights]
        return (f"--weights {weights} needs --hidden ({h}) and --inter ({i}) to be multiples "
                f"of {align} ({why})")
    if _accepts(e, h, i, 1, weights):
        return f"--top-k {k} exceeds the number of experts ({e})"
    return f"--experts {e}: {problem}"


def supported_weight_types(dtype: str, info: Mapping[str, Any]) -> list[str]:
    """The ``--weights`` values this build runs with ``--dtype dtype``.

    ``cutlass_fused_moe`` takes weights of the activation dtype, int8 weights with
    per-channel scales (W8A16), int4 weights with group-wise scales (W4A16), or FP8 (e4m3) and
    MXFP4 weight-only weights; with the extension loaded, ``build_info()["tactics"]`` (keys
    ``"<act>_<weight>[_...]"``) must also have kernels for that pair."""
    python_side = {dtype, "int8", *GROUP_SCALED_WEIGHTS}
    tactics = info.get("tactics") if info.get("extension_available") else None
    if not isinstance(tactics, Mapping):
        return sorted(python_side)
    built = set()
    for config in tactics:
        parts = str(config).split("_")
        if len(parts) >= 2 and parts[0] == dtype:
            built.add(parts[1])
    return sorted(python_side & built)


def check_weights(dtype: str, weights: str | None) -> str:
    """The weight type to use (``--dtype``'s when ``weights`` is None); :class:`CliError` when
    this build cannot run it."""
    weights = weights or dtype
    supported = supported_weight_types(dtype, _ext.build_info())
    if weights not in supported:
        if supported:
            listed = (supported[0] if len(supported) == 1
                      else ", ".join(supported[:-1]) + " or " + supported[-1])
            offer = f"it supports --weights {listed} with --dtype {dtype}"
        else:
            offer = f"it has no kernels for --dtype {dtype}"
        if weights == "int4":
            why = (f" (it was built without int4 weight-only (W4A16) kernels for --dtype "
                   f"{dtype})")
        elif weights in ("int8", "fp8", "mxfp4"):
            why = f" (it was built without {weights} weight-only kernels for --dtype {dtype})"
        elif weights != dtype:
            why = " (16-bit weights must have the activation dtype, --dtype)"
        else:
            why = ""
        raise CliError(f"--weights {weights} is not supported by this build: {offer}{why}")
    return weights


def weight_mode(weights: str) -> str:
    """``tune_model``'s ``weights`` argument for a ``--weights`` value."""
    return weights if weights in ("int8", *GROUP_SCALED_WEIGHTS) else "16bit"


def check_weight_shape(weights: str, preset: ModelPreset, parser: argparse.ArgumentParser
                       ) -> None:
    """The layer shape with the ``--weights`` value ``weights`` (int8 weights need H and I to
    be multiples of 16, int4, fp8 and mxfp4 weights of 32): ``parser.error`` when
    :func:`layer_shape_problem`
    finds a problem."""
    problem = layer_shape_problem(preset, weight_mode(weights))
    if problem is not None:
        parser.error(problem)


def quant_options(args: argparse.Namespace, weights: str,
                  models: Sequence[tuple[str, ModelPreset]], parser: argparse.ArgumentParser
                  ) -> tuple[int, bool]:
    """``(group size, asymmetric)`` of ``--group-size`` and ``--asym``. ``--group-size``
    applies to ``--weights int4`` and ``fp8`` (default
    :data:`cutlass_moe.bench.DEFAULT_INT4_GROUP_SIZE` / ``DEFAULT_FP8_GROUP_SIZE``; checked
    against every layer shape: a multiple of 32 dividing H and I) and to ``mxfp4`` (fixed at 32:
    omitted or 32); ``--asym`` to ``int4`` only. ``parser.error`` otherwise."""
    misplaced = []
    if args.group_size is not None and weights not in GROUP_SCALED_WEIGHTS:
        misplaced.append("--group-size applies to --weights int4, fp8 or mxfp4 only")
    if args.asym and weights != "int4":
        misplaced.append("--asym applies to --weights int4 only")
    if misplaced:
        parser.error(f"{'; '.join(misplaced)} (got --weights {weights})")
    if weights not in GROUP_SCALED_WEIGHTS:
        return bench.DEFAULT_INT4_GROUP_SIZE, False
    if weights == "mxfp4":
        if args.group_size not in (None, bench.MXFP4_GROUP_SIZE):
            parser.error(f"--group-size {args.group_size}: --weights mxfp4 has a fixed group "
                         f"size of {bench.MXFP4_GROUP_SIZE} (one e8m0 scale per "
                         f"{bench.MXFP4_GROUP_SIZE} weights); omit --group-size")
        return bench.MXFP4_GROUP_SIZE, False
    default = bench.DEFAULT_INT4_GROUP_SIZE if weights == "int4" else bench.DEFAULT_FP8_GROUP_SIZE
    group_size = args.group_size or default
    for name, preset in models:
        try:
            validation.check_group_size(group_size, preset.hidden_size, preset.inter_size,
                                        weights)
        except ValueError as exc:
            parser.error(f"--group-size {group_size} does not fit {name} "
                         f"(--hidden {preset.hidden_size}, --inter {preset.inter_size}): "
                         f"{str(exc).removeprefix(f'group_size={group_size} ')}")
    return group_size, bool(args.asym)


def kernel_label(dtype: str, weights: str, group_size: int | None = None,
                 asymmetric: bool = False) -> str:
    """``"bf16"``, ``"bf16 x int8 weights"`` for quantised weights, or ``"bf16 x int4 weights
    (group 128)"`` / ``"(group 128, zero points)"`` for int4 weights (and ``"bf16 x fp8 weights
    (group 128)"``, ``"bf16 x mxfp4 weights (group 32)"``) (table headers)."""
    if weights == dtype:
        return dtype
    label = f"{dtype} x {weights} weights"
    if weights in GROUP_SCALED_WEIGHTS and group_size:
        label += f" (group {group_size}{', zero points' if asymmetric else ''})"
    return label


def require_gpu_and_extension(command: str, device: torch.device) -> None:
    """:class:`CliError` (exit 2) without a CUDA device or without the compiled extension."""
    if not torch.cuda.is_available():
        raise CliError(f"no CUDA device is available; `{PROG} {command}` needs an NVIDIA GPU "
                       f"(`{PROG} info` shows what this installation has)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {device} does not exist: {torch.cuda.device_count()} CUDA "
                       "device(s) are visible")
    if not _ext.extension_available():
        raise CliError(str(_ext.build_info()["extension_error"]))


def default_cache_path() -> Path:
    """``$CUTLASS_MOE_TUNING_CACHE`` when set, else ``./cutlass_moe_tuning_cache.json``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_FILE)


def cache_path_problem(path: Path) -> str | None:
    """Why a tuning cache cannot be written at ``path`` (checked before tuning, so that no
    tuning is lost to a bad path), or None. Missing parent directories are fine: saving
    creates them."""
    if path.is_dir():
        return "is a directory; give a file name"
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if os.path.lexists(ancestor) and not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    return None


def cache_write_error(exc: OSError, path: Path) -> str:
    """One line for a failed save: the cache module's message names the file and the
    reason; other errors get both added."""
    text = str(exc)
    if text.startswith("cutlass_moe: "):
        return text.removeprefix("cutlass_moe: ")
    return f"cannot write tuning cache {path}: {exc.strerror or text}"


def gpu_label(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3 (cuda:0)"``, or the device alone when it cannot be queried."""
    try:
        return f"{torch.cuda.get_device_name(device)} ({device})"
    except (RuntimeError, AssertionError):  # CPU-only torch raises AssertionError
        return str(device)


def _us(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "failed"


def _speedup(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


class Progress:
    """``progress(done, total)`` callback drawing on stderr: a tqdm bar when tqdm is
    installed, else a plain status line (redrawn in place on a terminal)."""

    def __init__(self, description: str, enabled: bool = True, stream: TextIO | None = None
                 ) -> None:
        self.description = description
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._bar: Any = None
        self._line_open = False
        self._use_tqdm = importlib.util.find_spec("tqdm") is not None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._use_tqdm:
            if self._bar is None:
                from tqdm import tqdm  # optional dependency: imported only when drawing

                self._bar = tqdm(total=total, desc=self.description, unit="GEMM",
                                 file=self.stream, dynamic_ncols=True)
            self._bar.update(done - self._done)
        elif self.stream.isatty():
            self.stream.write(f"\r{self.description}: {done}/{total} GEMMs")
            self._line_open = True
        else:
            self.stream.write(f"{self.description}: {done}/{total} GEMMs\n")
        self.stream.flush()
        self._done = done

    def close(self) -> None:
        """Ends the bar or the status line (call once the work is over)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    info = diagnostics.collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(diagnostics.format_info(info, PROG))
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# tune
# ------------------------------------------------------------------------------------------


def tune_rows_by_bucket(rows: Sequence[autotuner.TuneRow]
                        ) -> list[tuple[int, dict[int, autotuner.TuneRow]]]:
    """``tune_model``'s rows grouped as ``[(bucket, {gemm: row})]`` in bucket order."""
    grouped: dict[int, dict[int, autotuner.TuneRow]] = {}
    for row in rows:
        grouped.setdefault(row.bucket, {})[row.gemm] = row
    return sorted(grouped.items())


def format_tune_table(rows: Sequence[autotuner.TuneRow]) -> str:
    """One line per bucket: each GEMM's tuned tactic, its time and its speed-up over the
    heuristic default, then both GEMMs together, tuned against default."""
    headers = ["bucket", "GEMM1 tactic", "GEMM1 us", "vs default", "GEMM2 tactic", "GEMM2 us",
               "vs default", "tuned us", "default us", "speed-up"]
    lines = []
    for bucket, gemms in tune_rows_by_bucket(rows):
        cells = [str(bucket)]
        for gemm in (1, 2):
            row = gemms.get(gemm)
            if row is None:
                cells += ["-", "-", "-"]
            else:
                cells += [row.best_tactic, _us(row.best_us),
                          _speedup(bench.ratio(row.default_us, row.best_us))]
        tuned = sum(r.best_us for r in gemms.values())
        default = sum(r.default_us for r in gemms.values())
        cells += [_us(tuned), _us(default), _speedup(bench.ratio(default, tuned))]
        lines.append(cells)
    return format_table(headers, lines, left=(1, 4))


def tune_row_json(row: autotuner.TuneRow) -> dict[str, Any]:
    """A ``TuneRow`` as JSON-able dict with its speed-up (None for inf/nan times)."""
    data = dataclasses.asdict(row)
    data["speedup"] = bench.ratio(row.default_us, row.best_us)
    return {k: bench.finite_or_none(v) for k, v in data.items()}


def _cmd_tune(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    name, preset = resolve_shape(args, parser)
    if preset.num_experts % args.ep_size:
        parser.error(f"--ep-size {args.ep_size} does not divide the {preset.num_experts} "
                     f"experts of {name} (each rank must hold E / ep-size experts)")
    out = Path(args.out) if args.out is not None else default_cache_path()
    problem = cache_path_problem(out)
    if problem is not None:
        parser.error(f"--out {out}: {problem}")
    weights = check_weights(args.dtype, args.weights)
    check_weight_shape(weights, preset, parser)
    group_size, asymmetric = quant_options(args, weights, [(name, preset)], parser)
    require_gpu_and_extension("tune", args.device)

    kept = 0
    if out.exists():
        kept = autotuner.load_tuning_cache(out)
        logger.info("read %d entries from %s; they are kept", kept, out)
    local_experts = preset.num_experts // args.ep_size
    progress = Progress(f"tuning {name}", enabled=not args.quiet)
    try:
        rows = autotuner.tune_model(
            local_experts, preset.hidden_size, preset.inter_size, preset.top_k,
            dtype=DTYPES[args.dtype], activation=ActivationType.Swiglu, ep_size=args.ep_size,
            max_tokens=args.max_tokens, device=args.device, progress=progress,
            weights=weight_mode(weights), group_size=group_size, asymmetric=asymmetric)
    except KeyboardInterrupt:
        progress.close()
        try:
            autotuner.save_tuning_cache(out)
        except OSError as exc:
            print(f"{PROG}: interrupted; {cache_write_error(exc, out)}", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; the buckets tuned so far were saved to {out}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except RuntimeError as exc:
        raise CliError(f"tuning failed: {exc}", status=EXIT_FAILED) from None
    finally:
        progress.close()
    try:
        autotuner.save_tuning_cache(out)
    except OSError as exc:
        raise CliError(cache_write_error(exc, out), status=EXIT_FAILED) from None

    label = gpu_label(args.device)
    if args.json:
        document = {
            "model": name,
            "num_experts": preset.num_experts,
            "num_experts_local": local_experts,
            "hidden_size": preset.hidden_size,
            "inter_size": preset.inter_size,
            "top_k": preset.top_k,
            "dtype": args.dtype,
            "weights": weights,
            **({"group_size": group_size, "asymmetric": asymmetric}
               if weights == "int4" else {}),
            **({"group_size": group_size} if weights in ("fp8", "mxfp4") else {}),
            "activation": ActivationType.Swiglu.name,
            "ep_size": args.ep_size,
            "max_tokens": args.max_tokens,
            "device": label,
            "cache_file": str(out),
            "rows": [tune_row_json(row) for row in rows],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    local = f" ({local_experts} per rank, ep-size {args.ep_size})" if args.ep_size > 1 else ""
    print(f"{name}: E={preset.num_experts}{local} H={preset.hidden_size} "
          f"I={preset.inter_size} k={preset.top_k}, "
          f"{kernel_label(args.dtype, weights, group_size, asymmetric)}, "
          f"Swiglu, on {label}")
    print(f"tuning cache written to {out}"
          + (f" (merged with the {kept} entries it had)" if kept else ""))
    print("vs default = the heuristic default tactic's time / the tuned tactic's time")
    print()
    print(format_tune_table(rows))
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------

def model_list(text: str) -> list[str]:
    """Comma-separated model presets, or ``all`` (``argparse`` type, ``action="extend"``)."""
    names = [p for p in (part.strip() for part in text.split(",")) if p]
    if [n.lower() for n in names] == ["all"]:
        return list(MODEL_PRESETS)
    if not names:
        raise argparse.ArgumentTypeError(f"expected model names or 'all', got {text!r}")
    return [model_name(n) for n in names]


def peer_list(text: str) -> list[str]:
    """Comma-separated peers of :data:`cutlass_moe.bench.PEERS`, ``all`` or ``none``
    (``argparse`` type)."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(bench.PEERS)
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in bench.PEERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated peers from {','.join(bench.PEERS)}, or all or none, "
            f"got {text!r}")
    return list(dict.fromkeys(names))


def resolve_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser
                   ) -> list[tuple[str, ModelPreset]]:
    """``bench``'s layer shapes: every ``--model`` (duplicates dropped), or the explicit
    numbers (``resolve_shape``'s checks and messages for each)."""
    if not args.model:
        return [resolve_shape(argparse.Namespace(**{**vars(args), "model": None}), parser)]
    return [resolve_shape(argparse.Namespace(**{**vars(args), "model": name}), parser)
            for name in dict.fromkeys(args.model)]


def _bench_title(config: bench.BenchConfig, label: str) -> str:
    tactics = {"both": "tuned and default"}.get(config.tactics, config.tactics)
    return (f"{kernel_label(config.dtype, config.weights, config.group_size, config.asymmetric)}"
            f", {config.routing} routing, "
            f"{tactics} tactics{', CUDA graph' if config.graph else ''}, on {label}")


def _cmd_bench(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    models = resolve_shapes(args, parser)
    outs = [Path(out) for out in args.out or []]
    for out in outs:
        if out.suffix.lower() not in (".csv", ".json"):
            parser.error(f"--out {out}: the file name must end in .csv or .json")
    plot = Path(args.plot) if args.plot is not None else None
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    weights = check_weights(args.dtype, args.weights)
    for _, preset in models:
        check_weight_shape(weights, preset, parser)
    group_size, asymmetric = quant_options(args, weights, models, parser)
    require_gpu_and_extension("bench", args.device)

    if args.tactics in ("tuned", "both"):
        cache = Path(args.cache) if args.cache is not None else default_cache_path()
        if cache.is_file():
            kept = autotuner.load_tuning_cache(cache)
            logger.info("read %d tuned entries from %s", kept, cache)
        else:
            logger.warning("no tuning cache at %s: untuned buckets run the heuristic default "
                           "(run `%s tune` first, or pass --cache)", cache, PROG)
    peers = list(bench.PEERS) if args.peers is None else args.peers
    config = bench.BenchConfig(
        models=models, dtype=args.dtype, weights=weights, tokens=list(args.tokens),
        routing=args.routing, tactics=args.tactics, graph=args.graph, warmup=args.warmup,
        repeats=args.repeats, max_tokens=args.max_tokens, device=args.device, seed=args.seed,
        peers=tuple(peers), stages=args.stages, rotate=args.rotate, flush_l2=not args.no_flush,
        pdl=not args.no_pdl, group_size=group_size, asymmetric=asymmetric)
    try:
        result = bench.run_bench(config)
    except torch.cuda.OutOfMemoryError as exc:
        raise CliError(f"out of GPU memory: {str(exc).splitlines()[0]}",
                       status=EXIT_FAILED) from None

    label = gpu_label(args.device)
    document_config = {**config.to_json(), "device": label}
    if len(models) == 1:
        name, preset = models[0]
        document_config.update(model=name, num_experts=preset.num_experts,
                               hidden_size=preset.hidden_size, inter_size=preset.inter_size,
                               top_k=preset.top_k)
    for out in outs:
        for path in bench.write_bench_rows(out, result, document_config):
            logger.info("wrote %s", path)
    if plot is not None:
        bench.plot_bench_rows(plot, result.rows, result.ceilings,
                              f"{', '.join(n for n, _ in models)}: "
                              f"{_bench_title(config, label)}")
        logger.info("wrote %s", plot)
    for note in result.notes:
        logger.info("note: %s", note)
    if args.json:
        print(json.dumps(bench.result_json(result, document_config), indent=2))
        return EXIT_OK
    for name, preset in models:
        print(f"{name}: {preset.describe()}")
    print(_bench_title(config, label))
    print(bench.format_ceilings(result.ceilings))
    print("mem = memory floor (bytes of touched experts + activations / copy bandwidth) / "
          "latency; compute = TFLOP/s / CUTLASS Sm80 rate; roofline = the larger")
    print()
    print(bench.format_bench_table(result.rows))
    if result.stages:
        print()
        print("per-stage kernel time per call (torch.profiler, eager calls, without PDL):")
        print(bench.format_stage_table(result.stages))
    if result.notes:
        print()
        for note in result.notes:
            print(f"note: {note}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------

_MODELS_HELP = "; ".join(
    f"{n} (E={p.num_experts} H={p.hidden_size} I={p.inter_size} k={p.top_k}"
    f"{', clamped SwiGLU' if p.clamped_swiglu else ''})"
    for n, p in MODEL_PRESETS.items())

_TOP_EPILOG = f"""\
examples:
  {PROG} info
  {PROG} tune --model mixtral-8x7b
  {PROG} tune --experts 64 --hidden 2048 --inter 1408 --top-k 6 --dtype fp16 --out moe.json
  {PROG} bench --model qwen3-30b-a3b --tokens 1,16,256,4096

Run `{PROG} COMMAND --help` for a command's options.
"""

_TUNE_DESCRIPTION = f"""\
Profiles every tactic of both GEMMs of one MoE layer (random weights of its shape, synthetic
balanced routing) for every token bucket up to --max-tokens (1, 2, 4, ..., max-tokens), keeps the
fastest per bucket and writes them to the tuning cache, so that cutlass_fused_moe never meets an
untuned bucket (for example while a server captures CUDA graphs). Entries already in the cache
file for other shapes or GPUs are kept. Prints a table: per bucket the tuned tactic of each
GEMM, its time and its speed-up over the heuristic default, and both GEMMs together.

Use the cache by pointing ${CACHE_ENV} at it, or with
cutlass_moe.load_tuning_cache(path)."""

_TUNE_EPILOG = f"""\
examples:
  {PROG} tune --model qwen3-30b-a3b
  {PROG} tune --model deepseek-v2-lite --ep-size 8 --max-tokens 4096 --out ds.json
  {PROG} tune --model mixtral-8x7b --weights int8
  {PROG} tune --model qwen3-30b-a3b --weights int4 --group-size 64 --asym
  {PROG} tune --model qwen3-30b-a3b --weights fp8 --group-size 128
  {PROG} tune --model gpt-oss-20b --weights mxfp4
  {PROG} tune --experts 16 --hidden 4096 --inter 2048 --top-k 2 --dtype fp16 --json
"""

_BENCH_DESCRIPTION = f"""\
The MoE layer benchmark (docs/architecture.md, "Benchmark"). For each model preset (or explicit
shape) and token count it times cutlass_fused_moe (random weights of the shape, random routing)
and, in the same run, its peers: the naive torch loop over experts (Hugging Face style), a
torch._grouped_mm MoE where this torch has it, and reference_moe (float32, up to
{bench.REFERENCE_MAX_TOKENS} tokens).

Method: CUDA events, --warmup calls, then the median of --repeats calls, each from an idle GPU
with the L2 flushed before it (a read of twice the L2 size: weights and activations are cold, as
in a real model where every layer has its own experts), cycling through --rotate input/routing
sets (default: enough that their activations exceed twice the L2). Each row reports latency,
achieved TB/s over the bytes of the experts actually touched (plus activations in and out),
TFLOP/s (2*T*k*3*H*I), the memory floor (those bytes over the measured copy bandwidth) and the
roofline fractions: floor/latency and TFLOP/s over the measured CUTLASS Sm80 dense GEMM rate
(our grouped GEMM, one expert, 8192^3; cuBLAS's rate is shown for reference). The ceilings are
measured at the start of the run.

--tuned (the default) takes our tactics from the tuning cache that `{PROG} tune` writes;
--default forces the heuristic default tactics; --both runs both. --graph times CUDA-graph
replays of our op (and of the grouped_mm peer when it captures); the other peers run eagerly.
--stages adds a per-stage kernel-time breakdown (routing, gather, GEMM arguments, GEMM1,
activation, GEMM2, finalize) from torch.profiler."""

_BENCH_EPILOG = f"""\
examples:
  {PROG} bench --model mixtral-8x7b
  {PROG} bench --model all --graph --stages --out bench/moe.csv --out bench/moe.json \\
      --plot bench/moe.png
  {PROG} bench --model qwen3-30b-a3b,deepseek-v2-lite --tokens 1,32,2048 --peers naive
  {PROG} bench --model gpt-oss-20b --tokens 1,8,32,128 --graph --out gpt-oss.json
  {PROG} bench --model qwen3-30b-a3b --default --routing zipf --json
  {PROG} bench --model mixtral-8x7b --weights int8 --tokens 1,8,64 --peers none
  {PROG} bench --model mixtral-8x7b --weights int4 --group-size 128 --tokens 1,8,64
  {PROG} bench --model gpt-oss-20b --weights mxfp4 --tokens 1,8,64
"""


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true",
                       help="print the result as JSON on stdout instead of a table")
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="log diagnostics (e.g. tactics that fail to launch) to stderr")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="no progress bar and no informational messages on stderr")


def _add_shape_options(parser: argparse.ArgumentParser, several: bool = False) -> None:
    group = parser.add_argument_group(
        "layer shape", "either --model NAME, or all four of --experts, --hidden, --inter and "
        "--top-k (not both)")
    if several:
        group.add_argument("--model", type=model_list, action="extend", metavar="NAME[,NAME]",
                           help="model presets, comma-separated or repeated, or 'all': "
                                f"{_MODELS_HELP}")
    else:
        group.add_argument("--model", type=model_name, metavar="NAME",
                           help=f"a model preset: {_MODELS_HELP}")
    group.add_argument("--experts", dest="num_experts", type=positive_int, metavar="E",
                       help="number of experts (all ranks together)")
    group.add_argument("--hidden", dest="hidden_size", type=positive_int, metavar="H",
                       help=f"hidden size (a multiple of {validation.ALIGN_ELEMS})")
    group.add_argument("--inter", dest="inter_size", type=positive_int, metavar="I",
                       help=f"expert intermediate size (a multiple of {validation.ALIGN_ELEMS}); "
                            "GEMM1 has 2*I outputs (SwiGLU)")
    group.add_argument("--top-k", dest="top_k", type=positive_int, metavar="K",
                       help="experts per token")


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kernel")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                       help="activation (and output) dtype (default: bf16)")
    group.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                       help="expert weight type (default: the --dtype): the --dtype, int8 "
                            "(weight-only, per-channel scales; H and I multiples of 16), int4 "
                            "(weight-only, group-wise scales, W4A16; H and I multiples of 32), "
                            "fp8 (e4m3 weight-only, float32 group-wise scales; H and I "
                            "multiples of 32) or mxfp4 (e2m1 weight-only, e8m0 scales per 32 "
                            "weights; H and I multiples of 32)")
    group.add_argument("--group-size", type=positive_int, default=None, metavar="G",
                       help="--weights int4 or fp8: the quantisation group along K, a multiple "
                            "of 32 dividing H and I (default: "
                            f"{bench.DEFAULT_INT4_GROUP_SIZE}); --weights mxfp4: fixed at "
                            f"{bench.MXFP4_GROUP_SIZE}; part of the tuning cache's key")
    group.add_argument("--asym", action="store_true",
                       help="--weights int4: asymmetric quantisation with zero points (default: "
                            "symmetric); part of the tuning cache's key")
    group.add_argument("--max-tokens", type=positive_int, default=8192, metavar="N",
                       help="the largest token bucket, cutlass_fused_moe's "
                            "tune_max_num_tokens (default: 8192)")
    group.add_argument("--device", type=cuda_device, default=torch.device("cuda"),
                       metavar="DEV", help="CUDA device to run on (default: the current one)")


def build_parser() -> argparse.ArgumentParser:
    """The ``cutlass-moe`` parser; each subcommand's parser sets ``handler`` and ``parser``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for cutlass_moe, the ahead-of-time compiled fused MoE layer: "
                    "inspect the build, tune kernels for a model, time the layer.",
        epilog=_TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info", help="build info, compiled archs, tactic counts, GPUs",
        description="Prints what this installation has: package, torch and CUDA versions, "
                    "whether the compiled extension loads (and why not), the CUDA archs, PTX "
                    "and tactic counts it was built with, the CUDA version the NVIDIA driver "
                    "supports and whether that is new enough, the visible GPUs and whether "
                    "the build has kernels for them, and the tuning cache in use. Works "
                    "without a GPU or driver.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_options(info)
    info.set_defaults(handler=_cmd_info, parser=info)

    tune = commands.add_parser(
        "tune", help="tune every token bucket of a layer shape and write the tuning cache",
        description=_TUNE_DESCRIPTION, epilog=_TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_shape_options(tune)
    _add_kernel_options(tune)
    tuning = tune.add_argument_group("tuning")
    tuning.add_argument("--ep-size", type=positive_int, default=1, metavar="N",
                        help="expert-parallel ranks: each holds E/N experts and sees the "
                             "tokens of one rank (default: 1)")
    tuning.add_argument("--out", metavar="FILE",
                        help="tuning cache to update; entries it has for other shapes are "
                             "kept, and missing parent directories are created (default: "
                             f"${CACHE_ENV} if set, else ./{DEFAULT_CACHE_FILE})")
    _add_common_options(tune)
    tune.set_defaults(handler=_cmd_tune, parser=tune)

    bench_parser = commands.add_parser(
        "bench", help="time cutlass_fused_moe and its peers per token count, with rooflines",
        description=_BENCH_DESCRIPTION, epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_shape_options(bench_parser, several=True)
    _add_kernel_options(bench_parser)
    run = bench_parser.add_argument_group("benchmark")
    run.add_argument("--tokens", type=token_counts, metavar="T,T,...",
                     default=list(bench.DEFAULT_BENCH_TOKENS),
                     help="token counts, comma-separated (default: "
                          f"{','.join(map(str, bench.DEFAULT_BENCH_TOKENS))})")
    tactics = run.add_mutually_exclusive_group()
    tactics.add_argument("--tuned", dest="tactics", action="store_const", const="tuned",
                         help="tactics from the tuning cache, the heuristic default where it "
                              "has none (the default)")
    tactics.add_argument("--default", dest="tactics", action="store_const", const="default",
                         help="force the heuristic default tactics")
    tactics.add_argument("--both", dest="tactics", action="store_const", const="both",
                         help="time tuned and default tactics (two rows per token count)")
    run.add_argument("--cache", metavar="FILE",
                     help=f"tuning cache for --tuned (default: ${CACHE_ENV} if set, "
                          f"else ./{DEFAULT_CACHE_FILE})")
    run.add_argument("--routing", choices=("uniform", "zipf"), default="uniform",
                     help="expert choice: uniform, or zipf (expert popularity ~ 1/rank, some "
                          "experts get many more tokens) (default: uniform)")
    run.add_argument("--graph", action="store_true",
                     help="capture each call in a CUDA graph and time its replay (no launch "
                          "overhead of the Python layer); peers that cannot be captured run "
                          "eagerly (the table's graph column says which)")
    run.add_argument("--peers", type=peer_list, default=None, metavar="P,P,...",
                     help=f"peers to time in the same run: {','.join(bench.PEERS)}, all or "
                          "none (default: all that this torch has)")
    run.add_argument("--stages", action="store_true",
                     help="per-stage kernel time of our op from torch.profiler")
    run.add_argument("--rotate", type=positive_int, default=None, metavar="N",
                     help="input/routing sets to cycle through (default: enough that their "
                          f"activations exceed twice the L2, at most {bench.MAX_ROTATE})")
    run.add_argument("--no-pdl", action="store_true",
                     help="launch our kernels without programmatic dependent launch (on sm_90+ "
                          "they use it by default)")
    run.add_argument("--no-flush", action="store_true",
                     help="do not flush the L2 before each timed call (warm-cache numbers)")
    run.add_argument("--warmup", type=positive_int, default=10, metavar="N",
                     help="untimed runs first (default: 10)")
    run.add_argument("--repeats", type=positive_int, default=50, metavar="N",
                     help="timed runs; the median is reported (default: 50)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run.add_argument("--out", metavar="FILE.csv|FILE.json", action="append",
                     help="also write the rows to a CSV (stage rows to FILE.stages.csv) or "
                          "JSON file; repeat for both")
    run.add_argument("--plot", metavar="FILE.png",
                     help="also plot latency and roofline fraction over T per model to an "
                          "image file (needs matplotlib)")
    _add_common_options(bench_parser)
    bench_parser.set_defaults(handler=_cmd_bench, parser=bench_parser, tactics="tuned")
    return parser


def _status(code: object) -> int:
    """A ``SystemExit`` code as an exit status."""
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_FAILED


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """Diagnostics of the package on stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(format=f"{PROG}: %(message)s")
    logging.getLogger("cutlass_moe").setLevel(level)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings (e.g. an unusable tuning cache) as one ``cutlass-moe: warning:`` line."""
    text = str(message).removeprefix("cutlass_moe: ")
    print(f"{PROG}: warning: {text}", file=file if file is not None else sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cutlass-moe`` and ``python -m cutlass_moe``; returns the exit status."""
    parser = build_parser()
    package_logger = logging.getLogger("cutlass_moe")
    saved_level = package_logger.level  # main() may run inside another program (tests)
    try:
        args = parser.parse_args(argv)
        _configure_logging(args.verbose, args.quiet)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args)
    except SystemExit as exc:  # --help, --version and parser.error
        return _status(exc.code)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        package_logger.setLevel(saved_level)


if __name__ == "__main__":
    sys.exit(main())
