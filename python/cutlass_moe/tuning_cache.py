"""The tuning cache's keys and its file format: versioned JSON, read defensively, written
atomically under a lock.

A cache file is one JSON object::

    {"schema": "cutlass_moe.tuning_cache", "version": 1, "build_id": "<build_id()>",
     "devices": {"<device>": [{"gemm": 1, "bucket": 16, <ShapeKey fields>,
                               "tactic": "<name>", "time_us": 12.5}, ...]}}

:func:`read_cache` never raises for anything about the file: an unusable file (missing,
unreadable, too large, not UTF-8, not JSON, another schema, version or build) gives one warning
and no entries, and malformed entries are dropped one by one with one summary warning.
:func:`write_cache` merges into the existing file under an exclusive lock and replaces it
atomically, so concurrent writers keep each other's entries and readers never see a partial
file.

Keys name the weight format in two fields: ``dtypes`` (``"bf16_int4_bf16"``: the weight entry is
the runner's weight type, a dtype or a packed format's tag) and ``quant``: ``"none"``,
``"int8_per_channel"``, or for int4 group-wise weights :func:`quant_int4`'s
``"int4_g<G1>[_g<G2>][_asym]"`` (the group sizes of GEMM1 and GEMM2, the second only when it
differs, and ``_asym`` with zero points). The kernels are the same for every group size, but the
group size (and the zero-point loads) change how many bytes a tactic streams per weight, so the
fastest tactic depends on them. FP8 (e4m3) weight-only weights are keyed ``"bf16_fp8_bf16"`` with
:func:`quant_fp8`'s ``"fp8_g<G1>[_g<G2>]"`` (no zero points), MXFP4 ones ``"bf16_mxfp4_bf16"``
with ``"mxfp4"`` (:data:`QUANT_MXFP4`: its group size is always 32). The file format did not
change for int4, fp8 or mxfp4 (still version 1): files written before them load as they did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import reprlib
import stat
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _ext

try:
    import fcntl
except ImportError:  # not POSIX: writes are still atomic, but concurrent merges may lose entries
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_ENV",
    "CACHE_SCHEMA",
    "CACHE_VERSION",
    "MAX_CACHE_BYTES",
    "QUANT_FP8",
    "QUANT_INT4",
    "QUANT_INT8_PER_CHANNEL",
    "QUANT_MXFP4",
    "QUANT_NONE",
    "WEIGHT_MODES",
    "ShapeKey",
    "TuningKey",
    "build_id",
    "dtype_tag",
    "known_tactics",
    "quant_fp8",
    "quant_int4",
    "read_cache",
    "write_cache",
]

#: Environment variable naming a tuning-cache file (loaded at first use, saved after tuning).
CACHE_ENV = "CUTLASS_MOE_TUNING_CACHE"
CACHE_SCHEMA = "cutlass_moe.tuning_cache"
CACHE_VERSION = 1
#: Files larger than this are not read. A cache holds a few hundred bytes per entry, so this
#: allows some 100,000 entries while bounding the memory a stray or hostile file can cost.
MAX_CACHE_BYTES = 32 << 20

#: ShapeKey.quant of the weight modes (part of the tuning cache's keys).
QUANT_NONE = "none"
QUANT_INT8_PER_CHANNEL = "int8_per_channel"
#: The prefix of int4 group-wise weights' ShapeKey.quant (:func:`quant_int4` adds the group
#: sizes and whether there are zero points).
QUANT_INT4 = "int4"
#: The prefix of FP8 (e4m3) weight-only weights' ShapeKey.quant (:func:`quant_fp8` adds the
#: group sizes).
QUANT_FP8 = "fp8"
#: ShapeKey.quant of MXFP4 weight-only weights (group size always 32, no zero points).
QUANT_MXFP4 = "mxfp4"
#: ``tune_model``'s ``weights`` values and their ShapeKey.quant (int4, fp8: the prefix).
WEIGHT_MODES = {"16bit": QUANT_NONE, "int8": QUANT_INT8_PER_CHANNEL, "int4": QUANT_INT4,
                "fp8": QUANT_FP8, "mxfp4": QUANT_MXFP4}

# Values quoted in warnings come from the file: their repr is bounded in length and depth.
_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 80

# /proc/self/status gives the umask without changing it (Linux >= 4.7).
_PROC_STATUS = "/proc/self/status"


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    """Everything besides the bucket that changes which GEMM kernel is fastest."""

    # "<activation>_<weight>_<output>", e.g. "bf16_bf16_bf16", "bf16_int8_bf16", "bf16_int4_bf16"
    dtypes: str
    # "none" (weights of the activation dtype), "int8_per_channel", quant_int4(...), e.g.
    # "int4_g128" or "int4_g128_asym", quant_fp8(...), e.g. "fp8_g128", or "mxfp4"
    quant: str
    num_experts: int  # experts on this rank
    hidden_size: int
    inter_size: int  # this TP rank's slice
    top_k: int
    activation: str  # ActivationType name
    ep_size: int  # rows per local expert scale with top_k / ep_size

    @property
    def num_experts_total(self) -> int:
        """Experts over all expert-parallel ranks."""
        return self.num_experts * self.ep_size


_SHAPE_STR_FIELDS = ("dtypes", "quant", "activation")
_SHAPE_INT_FIELDS = ("num_experts", "hidden_size", "inter_size", "top_k", "ep_size")
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ShapeKey))


@dataclasses.dataclass(frozen=True)
class TuningKey:
    """One cache entry's key: which GEMM, the shape, the GPU and the bucket."""

    gemm: int
    shape: ShapeKey
    device: str  # GPU name and SM count, e.g. "NVIDIA H100 80GB HBM3/132"
    bucket: int

    def to_json(self) -> dict[str, Any]:
        """The key's fields of a file entry (the device is the table it is listed under)."""
        return {"gemm": self.gemm, "bucket": self.bucket, **dataclasses.asdict(self.shape)}

    @classmethod
    def from_json(cls, entry: Any, device: Any) -> TuningKey:
        """The key of a file entry listed under ``device``. Raises ``KeyError`` for a missing
        field, ``TypeError`` for a field of the wrong type and ``ValueError`` for one out of
        range (see :func:`read_cache` for the rules)."""
        if not isinstance(entry, dict):
            raise TypeError(f"an entry must be a JSON object, not {type(entry).__name__}")
        shape = ShapeKey(**{name: entry[name] for name in _SHAPE_FIELDS})
        key = cls(entry["gemm"], shape, device, entry["bucket"])
        _check_key(key)
        return key


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but true/false in a file is a type error, not 1/0.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key(key: Any) -> None:
    """Raises TypeError/ValueError unless ``key`` is a TuningKey that a file can hold."""
    if not isinstance(key, TuningKey):
        raise TypeError(f"a key must be a TuningKey, not {type(key).__name__}")
    if not isinstance(key.shape, ShapeKey):
        raise TypeError(f"shape must be a ShapeKey, not {type(key.shape).__name__}")
    if not isinstance(key.device, str):
        raise TypeError(f"device must be a string, not {type(key.device).__name__}")
    for name in _SHAPE_STR_FIELDS:
        if not isinstance(getattr(key.shape, name), str):
            raise TypeError(f"{name} must be a string")
    for name in _SHAPE_INT_FIELDS:
        value = getattr(key.shape, name)
        if not _is_int(value):
            raise TypeError(f"{name} must be an integer")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if not _is_int(key.gemm) or not _is_int(key.bucket):
        raise TypeError("gemm and bucket must be integers")
    if key.gemm not in (1, 2):
        raise ValueError(f"gemm must be 1 or 2 (got {key.gemm})")
    if key.bucket < 1:
        raise ValueError(f"bucket must be >= 1 (got {key.bucket})")


def _check_value(value: Any) -> tuple[str, float]:
    """``(tactic, time_us)`` of an entry, or TypeError/ValueError: the tactic a non-empty
    string, the time a finite positive number."""
    tactic, time_us = value
    if not isinstance(tactic, str) or not tactic:
        raise TypeError("tactic must be a non-empty string")
    if isinstance(time_us, bool) or not isinstance(time_us, (int, float)):
        raise TypeError("time_us must be a number")
    time_us = float(time_us)  # OverflowError for an integer beyond float range
    if not math.isfinite(time_us) or time_us <= 0:
        raise ValueError(f"time_us must be finite and positive (got {time_us})")
    return tactic, time_us


_DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
               torch.int8: "int8"}


def dtype_tag(dtypes: Sequence[torch.dtype | str]) -> str:
    """ShapeKey.dtypes of (activation, weight, output) types, e.g. ``"bf16_int8_bf16"``; a
    packed weight format's tag stands for itself (``"bf16_int4_bf16"``)."""
    return "_".join(d if isinstance(d, str) else _DTYPE_TAGS.get(d, str(d).removeprefix("torch."))
                    for d in dtypes)


def quant_int4(group_sizes: Sequence[int], zeros: bool) -> str:
    """ShapeKey.quant of int4 group-wise weights with group sizes ``(G1, G2)`` (GEMM1's and
    GEMM2's) and zero points or not: ``"int4_g128"``, ``"int4_g2048_g768"`` (per-channel, H=2048,
    I=768), ``"int4_g128_asym"``. ValueError for a group size below 1."""
    g1, g2 = (int(g) for g in group_sizes)
    if g1 < 1 or g2 < 1:
        raise ValueError(f"int4 group sizes must be >= 1, got {(g1, g2)}")
    tag = f"{QUANT_INT4}_g{g1}" + (f"_g{g2}" if g2 != g1 else "")
    return tag + ("_asym" if zeros else "")


def quant_fp8(group_sizes: Sequence[int]) -> str:
    """ShapeKey.quant of FP8 (e4m3) weight-only weights with group sizes ``(G1, G2)``:
    ``"fp8_g128"``, ``"fp8_g2048_g768"`` (per-channel, H=2048, I=768). ValueError for a group
    size below 1."""
    g1, g2 = (int(g) for g in group_sizes)
    if g1 < 1 or g2 < 1:
        raise ValueError(f"fp8 group sizes must be >= 1, got {(g1, g2)}")
    return f"{QUANT_FP8}_g{g1}" + (f"_g{g2}" if g2 != g1 else "")


def build_id() -> str:
    """Identity of the compiled kernels: package, CUTLASS and CUDA versions. Tactic names are
    stable across builds, so a file from the same versions with fewer tactics stays usable."""
    info = _ext.build_info()
    return (
        f"{info.get('version', '?')}+cutlass{info.get('cutlass_version', '?')}"
        f"+cuda{info.get('cuda_version', '?')}"
    )


def known_tactics() -> set[str]:
    """Every tactic name of every runner configuration this build has (16-bit, int8, int4, fp8
    and mxfp4 weights, 16-bit and fp32 outputs). Needs the compiled extension (``RuntimeError``
    without it)."""
    names: set[str] = set()
    for dtype in (torch.float16, torch.bfloat16):
        weights: tuple[torch.dtype | str, ...] = (dtype, torch.int8, _ext.INT4, _ext.FP8,
                                                  _ext.MXFP4)
        for weight in weights:
            for out in (dtype, torch.float32):
                try:
                    runner = _ext.get_runner(dtype, weight, out)
                except ValueError:  # a build that does not know this configuration
                    continue
                for gemm in (1, 2):
                    names.update(str(d["name"]) for d in runner.all_tactics(gemm))
    return names


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def _fspath(path: Any) -> str:
    # An int would be taken as an open file descriptor by open(), and bytes are not a
    # documented path type: both are caller errors, not unusable files.
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _load_document(path: str) -> tuple[Any, str | None]:
    """The parsed JSON of ``path``, or ``(None, why it cannot be used)``."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None, "does not exist"
    except IsADirectoryError:
        return None, "is unreadable (it is a directory)"
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return None, f"is unreadable ({exc})"
    try:
        # fstat of the open file, not stat of the path: no race with a replacing writer.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            return None, f"is unreadable (it is {kind})"
        if st.st_size > MAX_CACHE_BYTES:
            return None, f"is too large ({st.st_size} bytes, the limit is {MAX_CACHE_BYTES})"
        # At most cap + 1 bytes even if the file grows meanwhile, in chunks so that memory
        # follows the file's size rather than the cap.
        chunks: list[bytes] = []
        remaining = MAX_CACHE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        return None, f"is unreadable ({exc})"
    finally:
        os.close(fd)
    if len(data) > MAX_CACHE_BYTES:
        return None, f"is too large (over the limit of {MAX_CACHE_BYTES} bytes)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "is unreadable (not UTF-8 text)"
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "is unreadable (JSON nested too deeply)"
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        return None, f"is unreadable ({exc})"


def _document_problem(document: Any, build: str | None) -> str | None:
    """Why a parsed cache document cannot be used, or None."""
    if not isinstance(document, dict) or document.get("schema") != CACHE_SCHEMA:
        return "is not a cutlass_moe tuning cache"
    version = document.get("version")
    if not _is_int(version) or version != CACHE_VERSION:
        return (f"has schema version {_brief.repr(version)}, this build reads version "
                f"{CACHE_VERSION}")
    expected = build_id() if build is None else build
    if document.get("build_id") != expected:
        return (f"was written by build {_brief.repr(document.get('build_id'))}, "
                f"this is {expected!r} (re-tune with `cutlass-moe tune`)")
    if not isinstance(document.get("devices"), dict):
        return "has no 'devices' table"
    return None


def _document_entries(
    devices: dict[str, Any], known: set[str] | None
) -> tuple[dict[TuningKey, tuple[str, float]], int]:
    """The well-formed entries of a ``devices`` table (naming a tactic of ``known``, any
    tactic when None) and how many others were dropped."""
    kept: dict[TuningKey, tuple[str, float]] = {}
    dropped = 0
    for device, items in devices.items():
        if not isinstance(items, list):
            dropped += 1
            continue
        for entry in items:
            try:
                key = TuningKey.from_json(entry, device)
                tactic, time_us = _check_value((entry["tactic"], entry["time_us"]))
            except (KeyError, TypeError, ValueError, OverflowError):
                dropped += 1
                continue
            if known is not None and tactic not in known:
                dropped += 1
                continue
            kept[key] = (tactic, time_us)
    return kept, dropped


def read_cache(
    path: str | os.PathLike[str],
    *,
    build: str | None = None,
    known: set[str] | None = None,
) -> dict[TuningKey, tuple[str, float]]:
    """The entries of the cache file at ``path``: ``{key: (tactic, time_us)}``.

    ``build`` is the build id the file must carry (default :func:`build_id`); ``known`` the
    tactic names entries may use (default :func:`known_tactics`, computed only for a file that
    passes the document checks). Never raises for anything about the file: one that is
    missing, not a regular file, larger than :data:`MAX_CACHE_BYTES`, not UTF-8, not JSON (or
    nested too deeply), not a cache document, or of another schema version or build gives one
    warning and ``{}``. Entries are checked one by one: every ShapeKey string field a string,
    every integer field an integer (not a bool) >= 1, gemm 1 or 2, bucket >= 1, tactic a known
    name, time_us a finite positive number; the others are dropped with one summary warning.
    Raises ``TypeError`` when ``path`` is not a str or os.PathLike.
    """
    name = _fspath(path)
    document, problem = _load_document(name)
    if problem is None:
        problem = _document_problem(document, build)
    if problem is not None:
        warnings.warn(f"cutlass_moe: tuning cache {name} {problem}; ignored", stacklevel=3)
        return {}
    kept, dropped = _document_entries(document["devices"],
                                      known_tactics() if known is None else known)
    if dropped:
        what = ("entry is malformed or names a tactic" if dropped == 1
                else "entries are malformed or name tactics")
        warnings.warn(f"cutlass_moe: tuning cache {name}: {dropped} {what} this build does "
                      "not have; dropped", stacklevel=3)
    return kept


def _read_quietly(path: str, build: str) -> dict[TuningKey, tuple[str, float]]:
    """The entries a writer merges with: those of a usable file of ``build``, else none. Tactic
    names are not filtered: a file of the same build names that build's tactics, and writing
    must not need the compiled extension."""
    document, problem = _load_document(path)
    if problem is not None or _document_problem(document, build) is not None:
        return {}
    return _document_entries(document["devices"], None)[0]


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _sort_key(key: TuningKey) -> tuple[Any, ...]:
    return (key.device, dataclasses.astuple(key.shape), key.gemm, key.bucket)


def _document(entries: Mapping[TuningKey, tuple[str, float]], build: str) -> dict[str, Any]:
    by_device: dict[str, list[dict[str, Any]]] = {}
    for key, (tactic, time_us) in sorted(entries.items(), key=lambda kv: _sort_key(kv[0])):
        # Three decimals keep files stable and small; a tiny time that would round to zero
        # keeps its exact value so that it stays a valid (positive) entry.
        rounded = round(time_us, 3) or time_us
        by_device.setdefault(key.device, []).append(
            {**key.to_json(), "tactic": tactic, "time_us": rounded}
        )
    return {"schema": CACHE_SCHEMA, "version": CACHE_VERSION, "build_id": build,
            "devices": by_device}


def _umask() -> int:
    """The process umask. os.umask can only read it by setting it, which races with threads
    creating files, so /proc is preferred where it exists."""
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _prepare_directory(target: Path, shown: str) -> None:
    """Refuses a directory target and creates missing parent directories, with messages that
    name the culprit."""
    if target.is_dir():
        raise IsADirectoryError(
            f"cutlass_moe: cannot write tuning cache {shown}: it is a directory")
    parent = target.parent
    if parent.is_dir():
        return
    blocker = _existing_ancestor(parent)
    if os.path.lexists(blocker) and not blocker.is_dir():
        raise NotADirectoryError(
            f"cutlass_moe: cannot write tuning cache {shown}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(
            f"cutlass_moe: cannot write tuning cache {shown}: cannot create its directory "
            f"{parent} ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _exclusive_lock(directory: Path) -> Iterator[None]:
    """Holds flock on the cache's ``directory``: writers of one directory take turns, and no
    lock file is left behind (a lock file could not be removed safely: a waiter would lock the
    unlinked file while a newcomer locks a fresh one)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            # A file system without locks (some NFS setups): the write is still atomic.
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_atomically(target: Path, document: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # mkstemp creates 0600; the cache is shared like any file this process creates.
            mode = 0o666 & ~_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:
                os.chmod(tmp, mode)
            json.dump(document, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory is synced (best effort; not on Windows).
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_cache(
    path: str | os.PathLike[str],
    entries: Mapping[TuningKey, tuple[str, float]],
    *,
    build: str | None = None,
) -> None:
    """Merges ``entries`` (``{key: (tactic, time_us)}``) into the cache file at ``path``.

    Under an exclusive lock on the file's directory (``fcntl.flock``; no lock
    where fcntl is missing), the existing file is re-read and its entries are kept unless
    ``entries`` has the same key; a file of another build (``build``, default
    :func:`build_id`), another version, or one that is corrupt is replaced, without a
    warning. The result is written to a temporary file in the same directory, given mode
    ``0o666 & ~umask``, synced and renamed over ``path``, so readers see the old or the new
    file, never a partial one; a failed write removes its temporary file. Entries are sorted
    by device, shape, GEMM and bucket, so equal contents give equal files.

    Missing parent directories are created. Raises ``TypeError`` when ``path`` is not a str
    or os.PathLike, ``TypeError``/``ValueError`` (before touching any file) for an entry that
    :func:`read_cache` would drop, ``IsADirectoryError`` when ``path`` is a directory,
    ``NotADirectoryError`` when a parent is not a directory, and other ``OSError`` from the
    file system; each ``OSError``'s message is one line naming ``path`` and the reason.
    """
    shown = _fspath(path)
    checked: dict[TuningKey, tuple[str, float]] = {}
    for key, value in entries.items():
        _check_key(key)
        try:
            checked[key] = _check_value(value)
        except OverflowError as exc:
            raise ValueError(f"time_us of {key} is out of range") from exc
    if build is None:
        build = build_id()
    target = Path(shown)
    _prepare_directory(target, shown)
    try:
        with _exclusive_lock(target.parent):
            merged = _read_quietly(shown, build)
            merged.update(checked)
            _replace_atomically(target, _document(merged, build))
    except OSError as exc:
        # The file system's own message names the temporary file; say which cache it was.
        raise type(exc)(f"cutlass_moe: cannot write tuning cache {shown}: "
                        f"{exc.strerror or exc}") from exc
