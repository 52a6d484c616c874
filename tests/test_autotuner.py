"""AutoTuner: buckets, keys, the persistent cache (CPU), and tuning on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from _helpers import rel_l2, run_in_threads
from cutlass_moe import ActivationType, autotuner, tuning_cache
from cutlass_moe.autotuner import AutoTuner, bucket_for, tuning_buckets
from cutlass_moe.tuning_cache import ShapeKey, TuningKey

SHAPE = ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 2, "Swiglu", 1)
INT8_SHAPE = ShapeKey("bf16_int8_bf16", "int8_per_channel", 8, 256, 128, 2, "Swiglu", 1)
_REAL_KNOWN_TACTICS = tuning_cache.known_tactics  # before the autouse fixture replaces it
DEVICE_ID = "Fake GPU/100"
KNOWN = {"tactic_a", "tactic_b", "tactic_c"}


@pytest.fixture(autouse=True)
def _fixed_build_id(monkeypatch):
    monkeypatch.setattr(tuning_cache, "build_id", lambda: "test-build")
    monkeypatch.setattr(tuning_cache, "known_tactics", lambda: set(KNOWN))


def _key(gemm=1, bucket=16, shape=SHAPE, device=DEVICE_ID):
    return TuningKey(gemm, shape, device, bucket)


def _tuner_with_entries() -> AutoTuner:
    tuner = AutoTuner()
    tuner.record(_key(1, 1), "tactic_a", 10.0)
    tuner.record(_key(2, 1), "tactic_b", 11.5)
    tuner.record(_key(1, 4096), "tactic_c", 900.25)
    tuner.record(_key(1, 16, device="Other GPU/64"), "tactic_b", 3.0)
    return tuner


# ------------------------------------------------------------------ buckets


def test_tuning_buckets_are_powers_of_two_then_the_cap():
    assert tuning_buckets(1) == [1]
    assert tuning_buckets(8) == [1, 2, 4, 8]
    assert tuning_buckets(8192)[-3:] == [2048, 4096, 8192]
    assert len(tuning_buckets(8192)) == 14
    assert tuning_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError, match="tune_max_num_tokens"):
        tuning_buckets(0)


@pytest.mark.parametrize(
    "num_tokens,cap,bucket",
    [(0, 8192, 1), (1, 8192, 1), (2, 8192, 2), (3, 8192, 4), (64, 8192, 64), (65, 8192, 128),
     (8191, 8192, 8192), (8192, 8192, 8192), (100000, 8192, 8192), (70, 100, 100),
     (20, 100, 32), (5, 4, 4)],
)
def test_bucket_for(num_tokens, cap, bucket):
    assert bucket_for(num_tokens, cap) == bucket
    assert bucket in tuning_buckets(cap)


# ------------------------------------------------------------------ keys


def test_keys_differ_in_every_field_that_changes_the_kernel():
    variants = [
        SHAPE,
        ShapeKey("fp16_fp16_fp16", "none", 8, 256, 128, 2, "Swiglu", 1),
        ShapeKey("bf16_bf16_fp32", "none", 8, 256, 128, 2, "Swiglu", 1),
        ShapeKey("bf16_bf16_bf16", "int8", 8, 256, 128, 2, "Swiglu", 1),
        INT8_SHAPE,
        ShapeKey("bf16_bf16_bf16", "none", 16, 256, 128, 2, "Swiglu", 1),
        ShapeKey("bf16_bf16_bf16", "none", 8, 512, 128, 2, "Swiglu", 1),
        ShapeKey("bf16_bf16_bf16", "none", 8, 256, 256, 2, "Swiglu", 1),
        ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 4, "Swiglu", 1),
        ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 2, "Relu", 1),
        ShapeKey("bf16_bf16_bf16", "none", 8, 256, 128, 2, "Swiglu", 2),
    ]
    keys = {_key(gemm, bucket, shape, device)
            for shape in variants for gemm in (1, 2) for bucket in (1, 2)
            for device in (DEVICE_ID, "Other GPU/64")}
    assert len(keys) == len(variants) * 2 * 2 * 2


def test_key_json_round_trip():
    key = _key(2, 512)
    assert TuningKey.from_json(key.to_json(), DEVICE_ID) == key


def test_dtype_tag():
    tag = tuning_cache.dtype_tag((torch.bfloat16, torch.bfloat16, torch.float32))
    assert tag == "bf16_bf16_fp32"
    assert tuning_cache.dtype_tag((torch.float16, torch.int8, torch.float16)) == "fp16_int8_fp16"


def test_int8_entries_round_trip(tmp_path):
    tuner = AutoTuner()
    tuner.record(_key(1, 8, INT8_SHAPE), "tactic_a", 3.0)
    tuner.record(_key(1, 8), "tactic_b", 4.0)  # the same shape with 16-bit weights
    path = tmp_path / "cache.json"
    tuner.save(path)
    entries = json.loads(path.read_text())["devices"][DEVICE_ID]
    assert {(e["dtypes"], e["quant"], e["tactic"]) for e in entries} == {
        ("bf16_int8_bf16", "int8_per_channel", "tactic_a"), ("bf16_bf16_bf16", "none", "tactic_b")}
    fresh = AutoTuner()
    assert fresh.load(path) == 2
    assert fresh.lookup(_key(1, 8, INT8_SHAPE)) == "tactic_a"
    assert fresh.lookup(_key(1, 8)) == "tactic_b"


def test_known_tactics_include_int8_and_int4_runners():
    """A cache's int8 and int4 entries survive loading: those runners' tactics are known names
    (the int4 runner is keyed by its weight-format tag, DType 4)."""
    from _fake_ext import FakeMoeRunner, make_fake_extension
    from cutlass_moe import _ext

    FakeMoeRunner.constructed.clear()
    with _ext._replaced_extension(make_fake_extension()):
        names = _REAL_KNOWN_TACTICS()
    assert names and all(name.startswith(("fake_", "sm80_bf16_int4_", "sm80_fp16_int4_",
                                          "sm80_bf16_fp8_", "sm80_fp16_fp8_",
                                          "sm80_bf16_mxfp4_", "sm80_fp16_mxfp4_",
                                          "sm80_decode")) for name in names)
    assert "sm80_bf16_int4_m16n128k64_w16x32x64_s4" in names
    assert "sm80_decode_gated_fp16_int4_m2n8_c2x4_u4" in names
    assert {"sm80_bf16_fp8_m16n128k64_w16x32x64_s4",
            "sm80_fp16_mxfp4_m128n128k64_w64x64x64_s3"} <= names  # fp8 (5) and mxfp4 (6)
    for weight in (_ext.dtype_to_enum(torch.int8), 4, 5, 6):
        assert {(act, weight, out) for act in (0, 1) for out in (act, 2)} <= set(
            FakeMoeRunner.constructed)


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "int2"}, "weights must be one of '16bit', 'int8', 'int4'"),
    ({"weights": "int4", "hidden_size": 48},
     r"int4 weights need hidden size H=48 and intermediate size I=128 to be multiples of 32"),
    ({"weights": "int4", "group_size": 48}, "group_size=48 must be a multiple of 32"),
    ({"weights": "int4", "group_size": 256}, r"group_size=256 must divide .* I=128"),
    ({"weights": "int4", "group_size": 0}, "group_size must be a positive integer"),
    ({"weights": "int8", "hidden_size": 24},
     r"int8 weights need hidden size H=24 and intermediate size I=128 to be multiples of 16"),
    ({"weights": "int8", "inter_size": 40}, "multiples of 16"),
])
def test_tune_model_argument_checks(monkeypatch, kwargs, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = {"num_experts": 8, "hidden_size": 256, "inter_size": 128, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        autotuner.tune_model(**args)


# ------------------------------------------------------------------ cache files


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    document = json.loads(path.read_text())
    assert document["schema"] == tuning_cache.CACHE_SCHEMA
    assert document["version"] == tuning_cache.CACHE_VERSION
    assert set(document["devices"]) == {DEVICE_ID, "Other GPU/64"}
    fresh = AutoTuner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.load(path) == 4
    assert fresh.entries() == _tuner_with_entries().entries()
    assert fresh.lookup(_key(1, 4096)) == "tactic_c"
    assert fresh.lookup(_key(2, 4096)) is None


def _assert_ignored(path, match):
    tuner = AutoTuner()
    tuner.record(_key(1, 2), "tactic_a", 1.0)
    with pytest.warns(UserWarning, match=match) as record:
        assert tuner.load(path) == 0
    assert len(record) == 1
    assert tuner.entries() == {_key(1, 2): ("tactic_a", 1.0)}  # existing entries untouched


def test_corrupt_file_is_ignored_with_one_warning(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(b"\x00\xffnot json at all")
    _assert_ignored(path, "unreadable")


def test_truncated_file_is_ignored(tmp_path):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    _assert_ignored(path, "unreadable")


def test_foreign_document_is_ignored(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"schema": "something.else", "version": 1}))
    _assert_ignored(path, "not a cutlass_moe tuning cache")
    path.write_text(json.dumps([1, 2, 3]))
    _assert_ignored(path, "not a cutlass_moe tuning cache")


def test_older_schema_is_ignored(tmp_path):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    document = json.loads(path.read_text())
    document["version"] = tuning_cache.CACHE_VERSION - 1
    path.write_text(json.dumps(document))
    _assert_ignored(path, "schema version")


def test_other_build_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    monkeypatch.setattr(tuning_cache, "build_id", lambda: "another-build")
    _assert_ignored(path, "another-build")


def test_missing_file_warns(tmp_path):
    _assert_ignored(tmp_path / "absent.json", "does not exist")


def test_unknown_tactics_and_malformed_entries_are_dropped(tmp_path):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    document = json.loads(path.read_text())
    entries = document["devices"][DEVICE_ID]
    entries[0]["tactic"] = "sm80_tactic_from_a_bigger_build"
    del entries[1]["bucket"]
    entries.append({"gemm": "one", "bucket": 2, "tactic": "tactic_a"})
    path.write_text(json.dumps(document))
    tuner = AutoTuner()
    with pytest.warns(UserWarning, match="3 entries"):
        kept = tuner.load(path)
    assert kept == 2  # one entry of DEVICE_ID survives, and the other GPU's
    assert tuner.lookup(_key(1, 16, device="Other GPU/64")) == "tactic_b"


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    _tuner_with_entries().save(path)
    before = path.read_bytes()

    def broken_dump(obj, f, **kwargs):
        f.write('{"schema": "cutlass_moe.tuning_cache", "ver')
        raise OSError("disk full")

    monkeypatch.setattr(tuning_cache.json, "dump", broken_dump)
    tuner = AutoTuner()
    tuner.record(_key(1, 8), "tactic_a", 2.0)
    with pytest.raises(OSError, match="disk full"):
        tuner.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_env_cache_loaded_at_first_use_and_saved_after_tuning(tmp_path, monkeypatch):
    path = tmp_path / "env_cache.json"
    _tuner_with_entries().save(path)
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(path))
    tuner = AutoTuner()
    assert tuner.entries() == {}
    assert tuner.lookup(_key(1, 1)) == "tactic_a"  # first use loads the file
    with tuner.tuning_mode():
        with tuner.tuning_mode():  # nested: saved once, when the outermost exits
            tuner.record(_key(2, 8), "tactic_c", 5.0)
        assert tuner.tuning
        assert AutoTuner().load(path) == 4  # not yet saved inside the outer context
    assert not tuner.tuning
    assert AutoTuner().load(path) == 5
    with tuner.tuning_mode(False):
        assert not tuner.tuning


def test_concurrent_record_lookup_save(tmp_path):
    tuner = AutoTuner()
    path = tmp_path / "cache.json"
    errors = []

    def worker(index):
        try:
            for bucket in range(1, 200):
                tuner.record(_key(1 + index % 2, bucket * 1000 + index), "tactic_a", 1.0)
                tuner.lookup(_key(1, bucket))
                if bucket % 50 == 0:
                    tuner.save(path)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    run_in_threads(worker, 8)
    assert not errors
    assert len(tuner.entries()) == 8 * 199
    tuner.save(path)
    assert AutoTuner().load(path) == 8 * 199


# ------------------------------------------------------------------ threads and contexts


def test_autotune_holds_only_for_the_context_that_entered_it():
    """Another thread's calls must not tune (nor refuse to run while it captures a graph)."""
    tuner = AutoTuner()
    seen = {}

    def other_thread():
        seen["tuning"] = tuner.tuning

    with tuner.tuning_mode():
        assert tuner.tuning
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == {"tuning": False}
    assert not tuner.tuning


def _fake_select_env(monkeypatch, tuner, tune_one):
    """select() on host tensors, with profiling stubbed by ``tune_one``."""
    from cutlass_moe import tactics

    monkeypatch.setattr(AutoTuner, "_can_profile", staticmethod(lambda device: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tactics, "candidate_names", lambda *args, **kwargs: sorted(KNOWN))
    monkeypatch.setattr(tactics, "default_for", lambda *args, **kwargs: "tactic_c")
    monkeypatch.setattr(tuner, "tune_one", tune_one)


def _select(tuner, num_tokens=16):
    dtypes = (torch.bfloat16,) * 3
    weights = (torch.empty(0), torch.empty(0))
    return tuner.select(None, dtypes, SHAPE, ActivationType.Swiglu,
                        torch.device("cpu"), num_tokens, 8192, weights)


def test_two_threads_missing_one_key_profile_it_once(monkeypatch):
    tuner = AutoTuner()
    profiled = []
    started = threading.Event()

    def tune_one(runner, gemm, shape, bucket, activation, device, weights, candidates,
                 scales=None, zeros=None, group_size=0):
        profiled.append((gemm, bucket))
        started.set()
        threading.Event().wait(0.2)  # long enough for the other thread to arrive
        tuner.record(TuningKey(gemm, shape, "cpu", bucket), "tactic_a", 1.0)
        return "tactic_a"

    _fake_select_env(monkeypatch, tuner, tune_one)
    results, errors = [], []

    def worker():
        try:
            with tuner.tuning_mode():
                results.append(_select(tuner))
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    run_in_threads(worker, 4, indexed=False)
    assert not errors
    assert results == [("tactic_a", "tactic_a")] * 4
    assert sorted(profiled) == [(1, 16), (2, 16)]  # each key once, not once per thread


def test_a_thread_outside_autotune_never_profiles(monkeypatch):
    tuner = AutoTuner()
    profiled = []

    def tune_one(*args, **kwargs):
        profiled.append(args)
        return "tactic_a"

    _fake_select_env(monkeypatch, tuner, tune_one)
    out = []
    with tuner.tuning_mode():
        thread = threading.Thread(target=lambda: out.append(_select(tuner)))
        thread.start()
        thread.join()
    assert out == [("tactic_c", "tactic_c")]  # the heuristic default
    assert profiled == []
    assert tuner.last_selection(1).source == "default"


def test_concurrent_first_use_waits_for_the_env_cache(tmp_path, monkeypatch):
    """A call arriving while the first one loads CUTLASS_MOE_TUNING_CACHE must see its
    entries, not an empty cache (it could bake a default tactic into a captured graph)."""
    path = tmp_path / "env_cache.json"
    _tuner_with_entries().save(path)
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(path))
    loading = threading.Event()
    real_read = autotuner.read_cache

    def slow_read(*args, **kwargs):
        loading.set()
        threading.Event().wait(0.3)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(autotuner, "read_cache", slow_read)
    tuner = AutoTuner()
    first = threading.Thread(target=tuner.lookup, args=(_key(1, 1),))
    first.start()
    assert loading.wait(5)
    assert tuner.lookup(_key(1, 1)) == "tactic_a"  # waits for the load in progress
    first.join()


def test_a_failed_save_on_leaving_autotune_is_a_warning(tmp_path, monkeypatch):
    """The body's own exception survives; the save's failure becomes a warning."""
    monkeypatch.setenv(tuning_cache.CACHE_ENV, str(tmp_path))  # a directory: cannot be written
    tuner = AutoTuner()

    def failing_block() -> None:
        with tuner.tuning_mode():
            tuner.record(_key(1, 2), "tactic_a", 1.0)
            raise KeyError("from the body")

    def empty_block() -> None:
        with tuner.tuning_mode():
            pass

    with (pytest.warns(UserWarning, match="could not save the tuning cache"),
          pytest.raises(KeyError, match="from the body")):
        failing_block()
    with pytest.warns(UserWarning, match="could not save the tuning cache"):
        empty_block()
    assert tuner.entries() == {_key(1, 2): ("tactic_a", 1.0)}


# ------------------------------------------------------------------ on the GPU

GPU_SHAPE = {"num_experts": 8, "hidden": 512, "inter": 256, "top_k": 2}


def _problem(num_tokens, dtype=torch.bfloat16, seed=0):
    e, h, i, k = (GPU_SHAPE[n] for n in ("num_experts", "hidden", "inter", "top_k"))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, h, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(num_tokens, e, device="cuda", generator=gen)
    scales, ids = torch.softmax(logits, -1).topk(k, -1)
    fc1 = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype, generator=gen) * h**-0.5
    fc2 = torch.randn(e, h, i, device="cuda", dtype=dtype, generator=gen) * i**-0.5
    return x, ids.int(), scales.float(), fc1, fc2


@pytest.fixture
def real_tuner(monkeypatch):
    """The process-wide tuner, emptied, with the real build id and tactic list."""
    monkeypatch.undo()
    monkeypatch.delenv(tuning_cache.CACHE_ENV, raising=False)
    tuner = autotuner.get_tuner()
    tuner.clear()
    yield tuner
    tuner.clear()


@pytest.mark.gpu
def test_tuning_records_a_tactic_per_bucket_and_gemm(real_tuner):
    import cutlass_moe

    counts = (1, 3, 40, 300)
    with cutlass_moe.autotune():
        for t in counts:
            x, ids, scales, fc1, fc2 = _problem(t)
            out = cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype,
                                                tune_max_num_tokens=256)[0]
            for gemm in (1, 2):
                assert real_tuner.last_selection(gemm).source == "tuned"
            ref = cutlass_moe.reference_moe(x, ids, scales, fc1, fc2)
            assert rel_l2(out.float(), ref) <= 1e-2
    buckets = {(k.gemm, k.bucket) for k in real_tuner.entries()}
    assert buckets == {(g, b) for g in (1, 2) for b in (1, 4, 64, 256)}
    # A second call in the same bucket comes from the cache, outside autotune() too.
    x, ids, scales, fc1, fc2 = _problem(50)
    cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, tune_max_num_tokens=256)
    assert real_tuner.last_selection(1).source == "cache"
    assert real_tuner.last_selection(1).bucket == 64
    # Outside autotune() a miss profiles nothing and uses the heuristic default.
    x, ids, scales, fc1, fc2 = _problem(50)
    cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, tune_max_num_tokens=8192,
                                  activation_type=cutlass_moe.ActivationType.Geglu)
    assert real_tuner.last_selection(1).source == "default"
    assert len(real_tuner.entries()) == 8


@pytest.mark.gpu
def test_tuned_and_default_tactics_agree_numerically(real_tuner):
    import cutlass_moe

    x, ids, scales, fc1, fc2 = _problem(200, seed=3)
    default = cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype)[0]
    assert real_tuner.last_selection(1).source == "default"
    with cutlass_moe.autotune():
        tuned = cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype)[0]
    assert real_tuner.last_selection(2).source == "tuned"
    ref = cutlass_moe.reference_moe(x, ids, scales, fc1, fc2)
    assert rel_l2(tuned.float(), ref) <= 1e-2
    assert rel_l2(tuned.float(), default.float()) <= 1e-2


@pytest.mark.gpu
def test_saved_cache_is_used_by_a_fresh_process(real_tuner, tmp_path):
    """A tactic recorded by hand (deliberately not the default) must be what a new process
    runs when CUTLASS_MOE_TUNING_CACHE names the saved file."""
    import cutlass_moe
    from cutlass_moe import _ext

    x, ids, scales, fc1, fc2 = _problem(24)
    cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype)
    default = real_tuner.last_selection(2)
    assert default.source == "default"
    descs = _ext.get_runner(x.dtype, x.dtype, x.dtype).tactics(2)
    other = next(str(d["name"]) for d in descs if d["name"] != default.tactic)
    shape = ShapeKey("bf16_bf16_bf16", "none", 8, 512, 256, 2, "Swiglu", 1)
    real_tuner.record(TuningKey(2, shape, autotuner.device_id(x.device), default.bucket),
                      other, 1.0)
    path = tmp_path / "tuned.json"
    cutlass_moe.save_tuning_cache(path)

    script = textwrap.dedent(
        """
        import torch, cutlass_moe
        from cutlass_moe import autotuner
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(24, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
        logits = torch.randn(24, 8, device="cuda", generator=gen)
        scales, ids = torch.softmax(logits, -1).topk(2, -1)
        fc1 = torch.randn(8, 512, 512, device="cuda", dtype=torch.bfloat16) * 512**-0.5
        fc2 = torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16) * 256**-0.5
        out = cutlass_moe.cutlass_fused_moe(x, ids.int(), scales.float(), fc1, fc2,
                                            torch.bfloat16)[0]
        ref = cutlass_moe.reference_moe(x, ids.int(), scales.float(), fc1, fc2)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        s = autotuner.get_tuner().last_selection(2)
        print(s.source, s.tactic, err)
        """
    )
    env = dict(os.environ, **{tuning_cache.CACHE_ENV: str(path)})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    source, tactic, err = result.stdout.split()
    assert (source, tactic) == ("cache", other)
    assert float(err) <= 1e-2


@pytest.mark.gpu
def test_tuning_during_graph_capture_is_refused(real_tuner):
    import cutlass_moe

    x, ids, scales, fc1, fc2 = _problem(16)
    out = torch.empty_like(x)
    cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, output=out)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with (
        pytest.raises(RuntimeError, match="CUDA-graph capture"),
        cutlass_moe.autotune(),
        torch.cuda.graph(graph),
    ):
        cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, output=out)
    assert real_tuner.entries() == {}


@pytest.mark.gpu
def test_concurrent_tuning_from_threads_and_streams(real_tuner):
    import cutlass_moe

    errors = []
    results = {}

    def worker(index):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                x, ids, scales, fc1, fc2 = _problem(8 + 37 * index, seed=index)
                with cutlass_moe.autotune():
                    out = cutlass_moe.cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype)[0]
                ref = cutlass_moe.reference_moe(x, ids, scales, fc1, fc2)
            stream.synchronize()
            results[index] = rel_l2(out.float(), ref)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    run_in_threads(worker, 4)
    assert not errors, errors
    assert all(err <= 1e-2 for err in results.values()), results
    buckets = {bucket_for(8 + 37 * i, 8192) for i in range(4)}
    assert {(k.gemm, k.bucket) for k in real_tuner.entries()} == {
        (g, b) for g in (1, 2) for b in buckets
    }


@pytest.mark.gpu
def test_tune_model_rows(real_tuner):
    rows = autotuner.tune_model(8, 512, 256, 2, max_tokens=64)
    assert [(r.bucket, r.gemm) for r in rows] == [(b, g) for b in tuning_buckets(64)
                                                 for g in (1, 2)]
    for r in rows:
        assert r.best_us > 0 and r.default_us >= r.best_us and r.speedup >= 1.0
    assert len(real_tuner.entries()) == len(rows)


@pytest.mark.gpu
def test_tune_model_int8_rows(real_tuner):
    rows = autotuner.tune_model(8, 512, 256, 2, max_tokens=8, weights="int8")
    assert [(r.bucket, r.gemm) for r in rows] == [(b, g) for b in tuning_buckets(8)
                                                 for g in (1, 2)]
    for r in rows:
        assert "_int8_" in r.best_tactic and "_int8_" in r.default_tactic
        assert r.best_us > 0 and r.default_us >= r.best_us
    keys = real_tuner.entries()
    assert len(keys) == len(rows)
    assert {(k.shape.dtypes, k.shape.quant) for k in keys} == {("bf16_int8_bf16",
                                                                 "int8_per_channel")}


def test_paths_are_strings_or_paths(tmp_path):
    tuner = _tuner_with_entries()
    tuner.save(str(tmp_path / "a.json"))
    tuner.save(Path(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
