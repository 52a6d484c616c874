"""The tuning cache file (CPU): keys, defensive reading, locked atomic writing."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import run_in_threads
from cutlass_moe import _ext, tuning_cache
from cutlass_moe.tuning_cache import (
    MAX_CACHE_BYTES,
    ShapeKey,
    TuningKey,
    read_cache,
    write_cache,
)

BUILD = "test-build"
KNOWN = {"tactic_a", "tactic_b", "tactic_c"}
DEVICE = "Fake GPU/100"
OTHER_DEVICE = "Other GPU/64"
SHAPE = ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 2, "Swiglu", 1)
INT8_SHAPE = ShapeKey("bf16_int8_bf16", "int8_per_channel", 8, 256, 128, 2, "Swiglu", 1)


def _key(gemm: int = 1, bucket: int = 16, shape: ShapeKey = SHAPE,
         device: str = DEVICE) -> TuningKey:
    return TuningKey(gemm, shape, device, bucket)


def _entries() -> dict[TuningKey, tuple[str, float]]:
    return {
        _key(1, 1): ("tactic_a", 10.0),
        _key(2, 1): ("tactic_b", 11.5),
        _key(1, 4096, INT8_SHAPE): ("tactic_c", 900.25),
        _key(1, 16, device=OTHER_DEVICE): ("tactic_b", 3.0),
    }


def _read(path: Any) -> dict[TuningKey, tuple[str, float]]:
    return read_cache(path, build=BUILD, known=KNOWN)


def _write(path: Any, entries: dict[TuningKey, tuple[str, float]]) -> None:
    write_cache(path, entries, build=BUILD)


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _assert_ignored(path: Any, match: str) -> None:
    """Reading ``path`` gives no entries and exactly one warning that names it."""
    with pytest.warns(UserWarning, match=match) as record:
        assert _read(path) == {}
    assert len(record) == 1
    assert str(record[0].message).startswith(f"cutlass_moe: tuning cache {os.fspath(path)} ")


def _document(devices: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"schema": tuning_cache.CACHE_SCHEMA, "version": tuning_cache.CACHE_VERSION,
            "build_id": BUILD, "devices": devices, **fields}


def _entry(**changes: Any) -> dict[str, Any]:
    entry = {**_key(1, 16).to_json(), "tactic": "tactic_a", "time_us": 2.5}
    entry.update(changes)
    return entry


# The exact bytes AutoTuner.save wrote for _entries() before this module existed.
OLD_FORMAT = """{
 "schema": "cutlass_moe.tuning_cache",
 "version": 1,
 "build_id": "test-build",
 "devices": {
  "Fake GPU/100": [
   {
    "gemm": 1,
    "bucket": 1,
    "dtypes": "bf16_bf16_bf16",
    "quant": "none",
    "num_experts": 8,
    "hidden_size": 256,
    "inter_size": 128,
    "top_k": 2,
    "activation": "Swiglu",
    "ep_size": 1,
    "tactic": "tactic_a",
    "time_us": 10.0
   },
   {
    "gemm": 2,
    "bucket": 1,
    "dtypes": "bf16_bf16_bf16",
    "quant": "none",
    "num_experts": 8,
    "hidden_size": 256,
    "inter_size": 128,
    "top_k": 2,
    "activation": "Swiglu",
    "ep_size": 1,
    "tactic": "tactic_b",
    "time_us": 11.5
   },
   {
    "gemm": 1,
    "bucket": 4096,
    "dtypes": "bf16_int8_bf16",
    "quant": "int8_per_channel",
    "num_experts": 8,
    "hidden_size": 256,
    "inter_size": 128,
    "top_k": 2,
    "activation": "Swiglu",
    "ep_size": 1,
    "tactic": "tactic_c",
    "time_us": 900.25
   }
  ],
  "Other GPU/64": [
   {
    "gemm": 1,
    "bucket": 16,
    "dtypes": "bf16_bf16_bf16",
    "quant": "none",
    "num_experts": 8,
    "hidden_size": 256,
    "inter_size": 128,
    "top_k": 2,
    "activation": "Swiglu",
    "ep_size": 1,
    "tactic": "tactic_b",
    "time_us": 3.0
   }
  ]
 }
}
"""


# ------------------------------------------------------------------ keys and constants


def test_constants_keep_their_values():
    assert tuning_cache.CACHE_ENV == "CUTLASS_MOE_TUNING_CACHE"
    assert tuning_cache.CACHE_SCHEMA == "cutlass_moe.tuning_cache"
    assert tuning_cache.CACHE_VERSION == 1
    assert tuning_cache.WEIGHT_MODES == {"16bit": "none", "int8": "int8_per_channel",
                                         "int4": "int4", "fp8": "fp8", "mxfp4": "mxfp4"}
    assert (tuning_cache.QUANT_NONE, tuning_cache.QUANT_INT8_PER_CHANNEL) == (
        "none", "int8_per_channel")


def test_key_json_round_trip():
    key = _key(2, 512, INT8_SHAPE)
    assert TuningKey.from_json(key.to_json(), DEVICE) == key
    assert ShapeKey("bf16_bf16_bf16", "none", 4, 256, 128, 2, "Swiglu", 8).num_experts_total == 32


def test_key_device_must_be_a_string():
    # JSON object keys are always strings, so this only guards callers of from_json.
    with pytest.raises(TypeError, match="device"):
        TuningKey.from_json(_entry(), 3)


def test_dtype_tag():
    assert tuning_cache.dtype_tag((torch.bfloat16, torch.bfloat16, torch.float32)) == (
        "bf16_bf16_fp32")
    assert tuning_cache.dtype_tag((torch.float16, torch.int8, torch.float16)) == (
        "fp16_int8_fp16")


def test_build_id_and_known_tactics_come_from_the_extension():
    from _fake_ext import FakeMoeRunner, make_fake_extension

    FakeMoeRunner.constructed.clear()
    with _ext._replaced_extension(make_fake_extension()):
        assert tuning_cache.build_id() == "0.0.0-fake+cutlass4.2.0+cuda13.0"
        names = tuning_cache.known_tactics()
    assert names and all(name.startswith(("fake_", "sm80_")) for name in names)
    assert {name for name in names if "_int4_" in name}  # the int4 runners' tactics
    for weight in (_ext.dtype_to_enum(torch.int8), _ext.dtype_to_enum(_ext.INT4)):
        assert {(act, weight, out) for act in (0, 1) for out in (act, 2)} <= set(
            FakeMoeRunner.constructed)


def test_quant_int4():
    assert tuning_cache.quant_int4((128, 128), False) == "int4_g128"
    assert tuning_cache.quant_int4((128, 64), False) == "int4_g128_g64"
    assert tuning_cache.quant_int4((32, 32), True) == "int4_g32_asym"
    with pytest.raises(ValueError, match="int4 group sizes must be >= 1"):
        tuning_cache.quant_int4((128, 0), False)
    assert tuning_cache.dtype_tag((torch.float16, "int4", torch.float32)) == "fp16_int4_fp32"


#: A cache file written before int4 existed (version 1, 16-bit and int8 entries), verbatim.
_PRE_INT4_FILE = """{
 "schema": "cutlass_moe.tuning_cache",
 "version": 1,
 "build_id": "test-build",
 "devices": {
  "Fake GPU/100": [
   {"gemm": 1, "bucket": 1, "dtypes": "bf16_bf16_bf16", "quant": "none", "num_experts": 8,
    "hidden_size": 256, "inter_size": 128, "top_k": 2, "activation": "Swiglu", "ep_size": 1,
    "tactic": "tactic_a", "time_us": 10.0},
   {"gemm": 1, "bucket": 4096, "dtypes": "bf16_int8_bf16", "quant": "int8_per_channel",
    "num_experts": 8, "hidden_size": 256, "inter_size": 128, "top_k": 2,
    "activation": "Swiglu", "ep_size": 1, "tactic": "tactic_c", "time_us": 900.25}
  ]
 }
}
"""
INT4_SHAPE = ShapeKey("bf16_int4_bf16", "int4_g128", 8, 256, 128, 2, "Swiglu", 1)
INT4_ASYM_SHAPE = ShapeKey("bf16_int4_bf16", "int4_g64_asym", 8, 256, 128, 2, "Swiglu", 1)


def test_files_from_before_int4_still_load_and_merge_with_int4_entries(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(_PRE_INT4_FILE)
    with _no_warnings():
        old = _read(path)
    assert old == {_key(1, 1): ("tactic_a", 10.0), _key(1, 4096, INT8_SHAPE): ("tactic_c", 900.25)}
    int4 = {_key(1, 1, INT4_SHAPE): ("tactic_b", 4.0), _key(1, 1, INT4_ASYM_SHAPE): ("tactic_c", 5.0)}
    _write(path, int4)  # merged into the old file: its entries stay
    with _no_warnings():
        assert _read(path) == {**old, **int4}
    entries = json.loads(path.read_text())["devices"][DEVICE]
    assert {(e["dtypes"], e["quant"]) for e in entries} == {
        ("bf16_bf16_bf16", "none"), ("bf16_int8_bf16", "int8_per_channel"),
        ("bf16_int4_bf16", "int4_g128"), ("bf16_int4_bf16", "int4_g64_asym")}
    assert json.loads(path.read_text())["version"] == 1  # the format did not change


# ------------------------------------------------------------------ round trips and format


def test_round_trip(tmp_path):
    path = tmp_path / "cache.json"
    with _no_warnings():
        _write(path, _entries())
        assert _read(path) == _entries()
        assert _read(str(path)) == _entries()


def test_file_written_by_autotuner_save_loads(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(OLD_FORMAT)
    with _no_warnings():
        assert _read(path) == _entries()


def test_written_format_is_unchanged_and_deterministic(tmp_path):
    forward, backward = tmp_path / "a.json", tmp_path / "b.json"
    _write(forward, _entries())
    _write(backward, dict(reversed(list(_entries().items()))))
    assert forward.read_text() == backward.read_text() == OLD_FORMAT


def test_times_are_rounded_but_never_to_zero(tmp_path):
    path = tmp_path / "cache.json"
    _write(path, {_key(1, 1): ("tactic_a", 900.2501), _key(1, 2): ("tactic_a", 1e-4)})
    assert _read(path) == {_key(1, 1): ("tactic_a", 900.25), _key(1, 2): ("tactic_a", 1e-4)}


def test_defaults_use_the_build_id_and_tactics_of_the_extension(tmp_path):
    from _fake_ext import make_fake_extension

    path = tmp_path / "cache.json"
    fake = "fake_g1_m16n128k64_s2"
    with _ext._replaced_extension(make_fake_extension()):
        write_cache(path, {_key(1, 1): (fake, 1.0), _key(1, 2): ("tactic_a", 2.0)})
        assert json.loads(path.read_text())["build_id"] == tuning_cache.build_id()
        with pytest.warns(UserWarning, match="1 entry is malformed or names a tactic") as rec:
            assert read_cache(path) == {_key(1, 1): (fake, 1.0)}
    assert len(rec) == 1


# ------------------------------------------------------------------ unusable files


def test_missing_file(tmp_path):
    _assert_ignored(tmp_path / "absent.json", "does not exist")


def test_directory(tmp_path):
    _assert_ignored(tmp_path, "it is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_not_waited_on(tmp_path):
    path = tmp_path / "cache.json"
    os.mkfifo(path)
    _assert_ignored(path, "not a regular file")


def test_file_over_the_size_cap_is_not_read(tmp_path):
    path = tmp_path / "cache.json"
    with open(path, "wb") as f:
        f.truncate(MAX_CACHE_BYTES + 1)  # sparse: costs no disk and, unread, no memory
    _assert_ignored(path, f"too large .*the limit is {MAX_CACHE_BYTES}")


def test_size_cap_boundary(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    _write(path, _entries())
    monkeypatch.setattr(tuning_cache, "MAX_CACHE_BYTES", path.stat().st_size)
    with _no_warnings():
        assert _read(path) == _entries()
    monkeypatch.setattr(tuning_cache, "MAX_CACHE_BYTES", path.stat().st_size - 1)
    _assert_ignored(path, "too large")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(OLD_FORMAT.replace("Fake GPU", "Fake\xff GPU").encode("latin-1"))
    _assert_ignored(path, "not UTF-8")


def test_binary_garbage(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(b"\x00\xffnot json at all")
    _assert_ignored(path, "unreadable")


def test_truncated_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(OLD_FORMAT[: len(OLD_FORMAT) // 2])
    _assert_ignored(path, "unreadable")


def test_deeply_nested_json(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("[" * 200_000)
    _assert_ignored(path, "nested too deeply")


def test_integer_of_too_many_digits_for_the_parser(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text('{"schema": ' + "9" * 50_000 + "}")
    _assert_ignored(path, "unreadable")


def test_nul_byte_in_path(tmp_path):
    _assert_ignored(str(tmp_path / "cache\0.json"), "unreadable")


@pytest.mark.parametrize("document", [[1, 2, 3], "cache", None, 3, {"schema": "other"}])
def test_not_a_cache_document(tmp_path, document):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(document))
    _assert_ignored(path, "not a cutlass_moe tuning cache")


@pytest.mark.parametrize("version", [0, 2, True, "1", 1.5, None])
def test_other_schema_version(tmp_path, version):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(_document({}, version=version)))
    _assert_ignored(path, "schema version")


def test_other_build(tmp_path):
    path = tmp_path / "cache.json"
    write_cache(path, _entries(), build="another-build")
    _assert_ignored(path, "another-build")


def test_values_quoted_from_the_file_are_shortened(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(_document({}, build_id="b" * 100_000)))
    with pytest.warns(UserWarning, match="was written by build 'bbb") as record:
        assert _read(path) == {}
    assert len(str(record[0].message)) < 400
    nested = "[" * 900 + "]" * 900
    path.write_text(json.dumps(_document({})).replace('"version": 1', f'"version": {nested}'))
    _assert_ignored(path, "schema version")


@pytest.mark.parametrize("devices", [None, [], "x", 3])
def test_devices_not_a_table(tmp_path, devices):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(_document(devices)))
    _assert_ignored(path, "no 'devices' table")


@pytest.mark.parametrize("path", [3, b"cache.json", None, 2.5])
def test_path_must_be_str_or_pathlike(path):
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        read_cache(path, build=BUILD, known=KNOWN)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        write_cache(path, {}, build=BUILD)


# ------------------------------------------------------------------ malformed entries


def _without(name: str) -> Callable[[dict[str, Any]], Any]:
    def change(entry: dict[str, Any]) -> dict[str, Any]:
        del entry[name]
        return entry
    return change


def _set(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda entry: {**entry, **changes}


BAD_ENTRIES = {
    "string field holding a list": _set(dtypes=["x"]),
    "string field holding an object": _set(activation={"name": "Swiglu"}),
    "string field holding a number": _set(quant=0),
    "int field holding a string": _set(hidden_size="256"),
    "int field holding a float": _set(top_k=2.0),
    "int field holding a list": _set(num_experts=[8]),
    "bool gemm": _set(gemm=True),
    "bool bucket": _set(bucket=True),
    "bool size": _set(ep_size=True),
    "gemm 0": _set(gemm=0),
    "gemm 3": _set(gemm=3),
    "bucket 0": _set(bucket=0),
    "negative bucket": _set(bucket=-16),
    "negative num_experts": _set(num_experts=-8),
    "negative hidden_size": _set(hidden_size=-256),
    "zero inter_size": _set(inter_size=0),
    "missing field": _without("quant"),
    "missing tactic": _without("tactic"),
    "missing time_us": _without("time_us"),
    "400-digit time_us": _set(time_us=int("9" * 400)),
    "zero time_us": _set(time_us=0),
    "negative time_us": _set(time_us=-1.5),
    "nan time_us": _set(time_us=float("nan")),
    "inf time_us": _set(time_us=float("inf")),
    "string time_us": _set(time_us="2.5"),
    "bool time_us": _set(time_us=True),
    "null time_us": _set(time_us=None),
    "tactic not a string": _set(tactic=5),
    "empty tactic": _set(tactic=""),
    "unknown tactic": _set(tactic="sm80_tactic_from_a_bigger_build"),
    "entry a string": lambda entry: "entry",
    "entry a number": lambda entry: 3,
    "entry null": lambda entry: None,
    "entry a list": lambda entry: list(entry.items()),
}


@pytest.mark.parametrize("change", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_malformed_entry_drops_only_itself(tmp_path, change):
    path = tmp_path / "cache.json"
    good = {**_key(1, 1).to_json(), "tactic": "tactic_b", "time_us": 1.0}
    path.write_text(json.dumps(_document({DEVICE: [good, change(_entry())]})))
    with pytest.warns(UserWarning, match="1 entry is malformed") as record:
        assert _read(path) == {_key(1, 1): ("tactic_b", 1.0)}
    assert len(record) == 1


def test_many_bad_entries_give_one_warning(tmp_path):
    path = tmp_path / "cache.json"
    bad = [change(_entry()) for change in BAD_ENTRIES.values()]
    path.write_text(json.dumps(_document({DEVICE: bad, OTHER_DEVICE: {"not": "a list"}})))
    with pytest.warns(UserWarning, match=f"{len(bad) + 1} entries are malformed") as record:
        assert _read(path) == {}
    assert len(record) == 1


def test_extra_fields_are_ignored(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(_document({DEVICE: [_entry(note="from a newer writer")]},
                                         comment="x")))
    with _no_warnings():
        assert _read(path) == {_key(1, 16): ("tactic_a", 2.5)}


# ------------------------------------------------------------------ writing


BAD_WRITES = {
    "key not a TuningKey": ({("gemm", 1): ("tactic_a", 1.0)}, TypeError),
    "device not a string": ({_key(device=3): ("tactic_a", 1.0)}, TypeError),
    "shape field of the wrong type": (
        {_key(shape=ShapeKey("bf16", "none", 8, 256, 128, True, "Swiglu", 1)): ("tactic_a", 1.0)},
        TypeError),
    "gemm 3": ({_key(gemm=3): ("tactic_a", 1.0)}, ValueError),
    "bucket 0": ({_key(bucket=0): ("tactic_a", 1.0)}, ValueError),
    "empty tactic": ({_key(): ("", 1.0)}, TypeError),
    "nan time": ({_key(): ("tactic_a", float("nan"))}, ValueError),
    "zero time": ({_key(): ("tactic_a", 0.0)}, ValueError),
    "huge integer time": ({_key(): ("tactic_a", 10**400)}, ValueError),
    "value not a pair": ({_key(): ("tactic_a",)}, ValueError),
}


@pytest.mark.parametrize("entries,error", BAD_WRITES.values(), ids=BAD_WRITES.keys())
def test_write_refuses_entries_that_read_would_drop(tmp_path, entries, error):
    path = tmp_path / "cache.json"
    _write(path, _entries())
    before = path.read_bytes()
    with pytest.raises(error):
        _write(path, {**_entries(), **entries})
    assert path.read_bytes() == before


def test_write_creates_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "cache.json"
    _write(path, _entries())
    assert _read(path) == _entries()
    # No lock file is left beside the cache (the lock is on the directory).
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_write_to_a_directory_fails_cleanly(tmp_path):
    target = tmp_path / "cache.json"
    target.mkdir()
    message = re.escape(f"tuning cache {target}: it is a directory")
    with pytest.raises(IsADirectoryError, match=message):
        _write(target, _entries())
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_write_under_a_regular_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{blocker} is not a directory")):
        _write(blocker / "sub" / "cache.json", _entries())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("broken", ["dump", "replace"])
def test_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch,
                                                                   broken):
    path = tmp_path / "cache.json"
    _write(path, _entries())
    before = path.read_bytes()

    def broken_dump(obj: Any, f: Any, **kwargs: Any) -> None:
        f.write('{"schema": "cutlass_moe.tuning_cache", "ver')
        raise OSError("disk full")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    if broken == "dump":
        monkeypatch.setattr(tuning_cache.json, "dump", broken_dump)
    else:
        monkeypatch.setattr(tuning_cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _write(path, {_key(1, 8): ("tactic_a", 2.0)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


@pytest.mark.parametrize("use_proc", [True, False], ids=["proc", "os.umask"])
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_the_umask(tmp_path, monkeypatch, mask, mode, use_proc):
    if not use_proc:
        monkeypatch.setattr(tuning_cache, "_PROC_STATUS", str(tmp_path / "no_such_file"))
    path = tmp_path / "cache.json"
    path.write_text(OLD_FORMAT)
    path.chmod(0o600)  # replaced, not rewritten in place: the old mode does not matter
    old = os.umask(mask)
    try:
        assert tuning_cache._umask() == mask
        _write(path, _entries())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# ------------------------------------------------------------------ merging


def test_merge_keeps_other_entries_and_the_new_entry_wins(tmp_path):
    path = tmp_path / "cache.json"
    _write(path, _entries())
    shared = _key(1, 1)
    _write(path, {shared: ("tactic_c", 5.0), _key(2, 8): ("tactic_a", 6.0)})
    assert _read(path) == {**_entries(), shared: ("tactic_c", 5.0),
                           _key(2, 8): ("tactic_a", 6.0)}


def test_merge_replaces_a_file_of_another_build_quietly(tmp_path):
    path = tmp_path / "cache.json"
    write_cache(path, _entries(), build="old-build")
    with _no_warnings():
        _write(path, {_key(2, 8): ("tactic_a", 6.0)})
        assert _read(path) == {_key(2, 8): ("tactic_a", 6.0)}


@pytest.mark.parametrize("content", [b"[" * 200_000, b"\xff\xfe", b'{"schema": "x"}', b""],
                         ids=["deeply nested", "not UTF-8", "foreign", "empty"])
def test_merge_replaces_a_corrupt_file_quietly(tmp_path, content):
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    with _no_warnings():
        _write(path, {_key(2, 8): ("tactic_a", 6.0)})
        assert _read(path) == {_key(2, 8): ("tactic_a", 6.0)}


def test_merge_drops_malformed_entries_quietly(tmp_path):
    path = tmp_path / "cache.json"
    unknown = {**_key(1, 2).to_json(), "tactic": "tactic_of_a_bigger_build", "time_us": 1.0}
    path.write_text(json.dumps(_document({DEVICE: [_entry(gemm=True), unknown]})))
    with _no_warnings():
        _write(path, {_key(2, 8): ("tactic_a", 6.0)})
    # Tactic names are not checked when merging (writing needs no extension): the entry of
    # an unknown tactic is kept in the file, and readers drop it as before.
    document = json.loads(path.read_text())
    assert [e["tactic"] for e in document["devices"][DEVICE]] == [
        "tactic_of_a_bigger_build", "tactic_a"]


ROUNDS = 20


def _write_rounds(path: str, index: int, barrier: Any) -> None:
    """One writer process: each round adds one entry of its own and checks that none of its
    earlier entries were lost (exit code 1 if they were)."""
    barrier.wait()
    for bucket in range(1, ROUNDS + 1):
        write_cache(path, {_key(1, bucket, device=f"proc{index}"): ("tactic_a", 1.0)},
                    build=BUILD)
        mine = {k for k in _read(path) if k.device == f"proc{index}"}
        if len(mine) != bucket:
            raise SystemExit(1)


def test_concurrent_processes_keep_each_others_entries(tmp_path):
    path = str(tmp_path / "cache.json")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_rounds, args=(path, i, barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _read(path) == {_key(1, b, device=f"proc{i}"): ("tactic_a", 1.0)
                           for i in range(2) for b in range(1, ROUNDS + 1)}


def test_concurrent_threads_keep_each_others_entries(tmp_path):
    path = tmp_path / "cache.json"
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for bucket in range(1, 11):
                _write(path, {_key(1 + index % 2, bucket, device=f"thread{index}"):
                              ("tactic_b", 2.0)})
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    run_in_threads(worker, 4)
    assert not errors
    assert len(_read(path)) == 4 * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_write_accepts_str_and_path(tmp_path):
    _write(str(tmp_path / "a.json"), _entries())
    _write(Path(tmp_path / "b.json"), _entries())
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
