"""The Hopper tactics (``sm90_*``: CUTLASS 3.x grouped GEMM with TMA and wgmma, sm_90a code;
built with CMake option CUTLASS_MOE_SM90_TACTICS) on a GPU against reference_moe.

Every sm90 tactic of each GEMM runs through the C++ runner, with a default Sm80 tactic on the
other GEMM and with sm90 tactics on both: fp16 and bf16; K and N residues (H = 536, I = 264: K of
both GEMMs and N of both leave partial 64-deep K-tiles and partial column tiles); T in {0, 1,
300, 4096}; empty experts, all rows on one expert, ids out of range, E = 1; SwiGLU (GEMM1
unfused, the activation kernel after it), clamped SwiGLU with both biases, ReLU and Identity
(with and without fc1 bias); NaN-poisoned outputs and workspaces; exact workspace sizes; the
profiling entry points; CUDA-graph capture and replay against an eager run (bitwise), with and
without programmatic dependent launch.

The tactics exist only in builds with the option and run only on compute capability 9.0: the
kernel tests skip elsewhere. Two checks run on any GPU with the extension: that the build lists
either no sm90 tactic at all (the option off) or exactly the generator's family, and that sm90
tactics are never runnable on other GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from _helpers import clamped_swiglu_params, descriptors, random_tokens, record_error, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe, tactics

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]
HIDDEN, INTER = 536, 264  # K and N residues in both GEMMs
TOKENS = [0, 1, 300, 4096]
ROOT = Path(__file__).resolve().parents[1]


def _is_sm90(desc) -> bool:
    return int(desc.get("required_cc", 0)) == 90 or str(desc["name"]).startswith("sm90_")


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is available")
    try:
        return _ext.load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the extension is not built: {exc}")


@pytest.fixture(scope="module")
def hopper(ext):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 tactics run on compute capability 9.0 GPUs only")
    return ext


def _sm90(dtype, gemm):
    """The runnable sm90 descriptors of GEMM ``gemm`` and the runner; skips without any."""
    runner = _ext.get_runner(dtype, dtype, dtype)
    descs = [d for d in descriptors(runner, gemm) if _is_sm90(d)]
    if not descs:
        compiled = [d["name"] for d in runner.all_tactics(gemm) if _is_sm90(d)]
        assert not compiled, f"sm90 tactics compiled but not runnable on this 9.0 GPU: {compiled}"
        pytest.skip("this build has no sm90 tactics (CUTLASS_MOE_SM90_TACTICS=OFF)")
    return descs, runner


def _default(runner, gemm, activation, rows):
    """The heuristic default among the non-sm90 tactics (the other GEMM's partner)."""
    return tactics.default_tactic(
        [d for d in descriptors(runner, gemm)
         if tactics.supports_activation(d, activation) and not _is_sm90(d)], rows)


@functools.lru_cache(maxsize=8)
def _layer(num_experts, dtype, gated):
    gen = torch.Generator(device=DEVICE).manual_seed(num_experts + (100 if gated else 0))
    n1 = 2 * INTER if gated else INTER
    fc1 = (torch.randn(num_experts, n1, HIDDEN, device=DEVICE, generator=gen)
           * HIDDEN**-0.5).to(dtype)
    fc2 = (torch.randn(num_experts, HIDDEN, INTER, device=DEVICE, generator=gen)
           * INTER**-0.5).to(dtype)
    return fc1, fc2


def _run(x, ids, scales, fc1, fc2, names, **kwargs):
    output = torch.full_like(x, float("nan"))
    cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, output=output, tactics=names, **kwargs)
    assert not output.isnan().any(), f"{names}: some output elements were not written"
    return output


def _check(x, ids, scales, fc1, fc2, names, label, **kwargs):
    out = _run(x, ids, scales, fc1, fc2, names, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "enable_pdl"}
    ref = reference_moe(x, ids, scales, fc1, fc2, **ref_kwargs)
    err = record_error(x.dtype, rel_l2(out.float(), ref))
    return [] if err <= TOLERANCE[x.dtype] else [f"{label} {names}: rel err {err:.3g}"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", [1, 2])
def test_every_sm90_tactic_matches_the_reference(hopper, gemm, dtype):
    descs, runner = _sm90(dtype, gemm)
    num_experts, top_k = 8, 2
    failures = []
    for desc in descs:
        for activation in (ActivationType.Swiglu, ActivationType.Relu):
            gated = activation == ActivationType.Swiglu
            fc1, fc2 = _layer(num_experts, dtype, gated)
            for num_tokens in TOKENS:
                x, ids, scales = random_tokens(num_tokens, HIDDEN, num_experts, top_k, dtype,
                                               num_tokens + gemm, DEVICE)
                other = _default(runner, 3 - gemm, activation,
                                 num_tokens * top_k / num_experts)
                names = (desc["name"], other) if gemm == 1 else (other, desc["name"])
                label = f"{activation.name} T={num_tokens}"
                if num_tokens == 0:
                    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, tactics=names,
                                            activation_type=activation)[0]
                    assert out.shape == (0, HIDDEN)
                    continue
                failures += _check(x, ids, scales, fc1, fc2, names, label,
                                   activation_type=activation)
    assert not failures, "\n".join(failures)


def _pairs(dtype):
    """(GEMM1, GEMM2) sm90 pairs: each tactic at least once on each side."""
    gemm1, _ = _sm90(dtype, 1)
    gemm2, _ = _sm90(dtype, 2)
    count = max(len(gemm1), len(gemm2))
    return [(gemm1[i % len(gemm1)]["name"], gemm2[(i + 1) % len(gemm2)]["name"])
            for i in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sm90_edge_cases(hopper, dtype):
    """sm90 tactics on both GEMMs."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    failures = []
    for names in _pairs(dtype):
        num_experts = 8
        fc1, fc2 = _layer(num_experts, dtype, True)
        # Empty experts: two of eight get every row.
        x, ids, scales = random_tokens(300, HIDDEN, num_experts, 2, dtype, 1, DEVICE)
        ids[:, 0], ids[:, 1] = 2, 5
        failures += _check(x, ids, scales, fc1, fc2, names, "two experts")
        # All rows on one expert: many row tiles of one problem.
        x, ids, scales = random_tokens(4096, HIDDEN, num_experts, 1, dtype, 2, DEVICE)
        ids[:, 0] = 7
        failures += _check(x, ids, scales, fc1, fc2, names, "one expert")
        # Ids out of range (negative, E, far beyond) contribute zero.
        x, ids, scales = random_tokens(33, HIDDEN, num_experts, 2, dtype, 4, DEVICE)
        ids[0, 0], ids[1, 1], ids[2, 0] = -1, num_experts, 1000
        failures += _check(x, ids, scales, fc1, fc2, names, "ids out of range")
        # Biases and the clamped SwiGLU, inputs large enough to clamp.
        x, ids, scales = random_tokens(300, HIDDEN, num_experts, 2, dtype, 5, DEVICE)
        b1 = (torch.randn(fc1.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
        b2 = (torch.randn(num_experts, HIDDEN, device=DEVICE, generator=gen) * 0.5).to(dtype)
        failures += _check(x * 3, ids, scales, fc1, fc2, names, "biases + clamp",
                           fc1_expert_biases=b1, fc2_expert_biases=b2,
                           **clamped_swiglu_params(num_experts, gen))
        # Ungated: Identity without fc1 bias (GEMM2 reads GEMM1's output), with it, and ReLU.
        fc1u, fc2u = _layer(num_experts, dtype, False)
        b1u = (torch.randn(fc1u.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
        x, ids, scales = random_tokens(300, HIDDEN, num_experts, 2, dtype, 6, DEVICE)
        for activation, bias in ((ActivationType.Identity, None), (ActivationType.Identity, b1u),
                                 (ActivationType.Relu, b1u)):
            failures += _check(x, ids, scales, fc1u, fc2u, names,
                               f"{activation.name} bias={bias is not None}",
                               activation_type=activation, fc1_expert_biases=bias)
        # One expert in the layer, k = 1.
        fc1e, fc2e = _layer(1, dtype, True)
        x, ids, scales = random_tokens(300, HIDDEN, 1, 1, dtype, 7, DEVICE)
        failures += _check(x, ids, scales, fc1e, fc2e, names, "E=1")
        # Many experts, few rows each (most problems empty, the rest shorter than a tile).
        fc1m, fc2m = _layer(128, dtype, True)
        x, ids, scales = random_tokens(5, HIDDEN, 128, 8, dtype, 8, DEVICE)
        failures += _check(x, ids, scales, fc1m, fc2m, names, "E=128 T=5")
    assert not failures, "\n".join(failures)


def _nan_workspace(num_bytes):
    return torch.full((num_bytes,), 0xFF, dtype=torch.uint8, device=DEVICE)


def _plain_sm80(runner, gemm):
    """An Sm80 CUTLASS tactic of GEMM ``gemm`` with the sm90 tactics' workspace plan (not fused,
    not split, not a decode kernel)."""
    for d in descriptors(runner, gemm):
        if not (_is_sm90(d) or d.get("gated") or d.get("decode") or int(d["split_k"]) > 1):
            return str(d["name"])
    pytest.skip(f"no plain Sm80 GEMM{gemm} tactic in this build")


#: Kernel workspace of an sm90 tactic: per persistent CTA (the runner reserves it for 144, a full
#: GH100), TMA descriptor copies of A, B and one D per consumer warp group, 128 bytes each.
SM90_KERNEL_WORKSPACE = 144 * (2 + 2) * 128


@pytest.mark.parametrize("dtype", DTYPES)
def test_sm90_exact_workspace_through_the_runner(hopper, dtype):
    """A run_moe call given exactly workspace_size(...) bytes (NaN-filled) matches the reference;
    one byte less is refused. sm90 tactics take an Sm80 tactic's layout plus their kernel
    workspace."""
    _, runner = _sm90(dtype, 1)
    num_tokens, num_experts, top_k = 300, 8, 2
    fc1, fc2 = _layer(num_experts, dtype, True)
    x, ids, scales = random_tokens(num_tokens, HIDDEN, num_experts, top_k, dtype, 9, DEVICE)
    ref = reference_moe(x, ids, scales, fc1, fc2)
    swiglu = _ext.activation_to_enum(ActivationType.Swiglu)
    shape = (num_tokens, HIDDEN, INTER, num_experts, top_k, swiglu)
    size_plain = int(runner.workspace_size(*shape, tactic1=_plain_sm80(runner, 1),
                                           tactic2=_plain_sm80(runner, 2)))
    stream = torch.cuda.current_stream().cuda_stream
    failures = []
    for names in _pairs(dtype):
        size = int(runner.workspace_size(*shape, tactic1=names[0], tactic2=names[1]))
        assert size - size_plain == SM90_KERNEL_WORKSPACE, (names, size, size_plain)
        assert int(runner.workspace_size(*shape)) >= size
        workspace = _nan_workspace(size)
        out = torch.full_like(x, float("nan"))
        runner.run_moe(num_tokens, HIDDEN, INTER, num_experts, top_k, 0, swiglu, x.data_ptr(),
                       ids.data_ptr(), scales.data_ptr(), fc1.data_ptr(), fc2.data_ptr(), 0, 0,
                       0, 0, 0, out.data_ptr(), workspace.data_ptr(), size, names[0], names[1],
                       stream)
        torch.cuda.synchronize()
        err = record_error(dtype, rel_l2(out.float(), ref))
        if not err <= TOLERANCE[dtype]:
            failures.append(f"{names}: rel err {err:.3g}")
        with pytest.raises(ValueError, match="workspace has"):
            runner.run_moe(num_tokens, HIDDEN, INTER, num_experts, top_k, 0, swiglu,
                           x.data_ptr(), ids.data_ptr(), scales.data_ptr(), fc1.data_ptr(),
                           fc2.data_ptr(), 0, 0, 0, 0, 0, out.data_ptr(), workspace.data_ptr(),
                           size - 1, names[0], names[1], stream)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sm90_profiling_entry_points(hopper, dtype):
    """The tuner times tactics through prepare_gemm_profile / run_gemm_profile."""
    swiglu = _ext.activation_to_enum(ActivationType.Swiglu)
    num_experts = 8
    fc1, fc2 = _layer(num_experts, dtype, True)
    stream = torch.cuda.current_stream().cuda_stream
    for gemm, weights in ((1, fc1), (2, fc2)):
        descs, runner = _sm90(dtype, gemm)
        for num_tokens in (1, 300):
            args = (num_tokens, HIDDEN, INTER, num_experts, 2, swiglu)
            size = int(runner.workspace_size(*args))
            workspace = _nan_workspace(size)
            runner.prepare_gemm_profile(gemm, *args, weights.data_ptr(), workspace.data_ptr(),
                                        size, 1, stream)
            for desc in descs:
                runner.run_gemm_profile(gemm, desc["name"], *args, workspace.data_ptr(), size,
                                        stream)
            torch.cuda.synchronize()


@pytest.mark.parametrize("enable_pdl", [True, False])
def test_sm90_graph_replay_matches_eager(hopper, enable_pdl):
    """Kernel parameters are built on the host at every launch and the descriptor workspace is
    written by the kernel itself: capture needs no set-up outside it, and replays (whose
    workspace is the capture's) equal an eager run bitwise."""
    dtype = torch.bfloat16
    fc1, fc2 = _layer(8, dtype, True)
    for names in _pairs(dtype):
        x, ids, scales = random_tokens(300, HIDDEN, 8, 2, dtype, 11, DEVICE)
        eager = _run(x, ids, scales, fc1, fc2, names, enable_pdl=enable_pdl)
        assert torch.equal(_run(x, ids, scales, fc1, fc2, names, enable_pdl=enable_pdl), eager)
        out = torch.full_like(x, float("nan"))

        def call(out=out, names=names, x=x, ids=ids, scales=scales):
            cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, output=out, tactics=names,
                              enable_pdl=enable_pdl)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager), names


# ------------------------------------------------------------------ any GPU


def _generator():
    name = "_cutlass_moe_generate_kernels_sm90_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "generate_kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_build_lists_no_sm90_tactic_or_the_whole_family(ext):
    """A build without CUTLASS_MOE_SM90_TACTICS (or with it but without sm_90 in its archs)
    lists no sm90 tactic; a build with it lists exactly the generator's sm90 family."""
    fast = bool(_ext.build_info().get("fast_build"))
    expected = {t.name for t in _generator().sm90_tactics(fast)}
    found = set()
    for dtype in DTYPES:
        runner = _ext.get_runner(dtype, dtype, dtype)
        for gemm in (1, 2):
            found |= {d["name"] for d in runner.all_tactics(gemm) if _is_sm90(d)}
            for d in runner.all_tactics(gemm):
                assert int(d.get("required_cc", 0)) in (0, 90), d["name"]
                assert _is_sm90(d) == (int(d.get("required_cc", 0)) == 90), d["name"]
    for weights in (torch.int8, "int4"):
        runner = _ext.get_runner(torch.bfloat16, weights, torch.bfloat16)
        assert not [d["name"] for d in runner.all_tactics(1) if _is_sm90(d)]
    assert found in (set(), expected), sorted(found ^ expected)


def test_sm90_tactics_run_on_compute_capability_9_0_only(ext):
    runner = _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    compiled = [d for d in runner.all_tactics(1) if _is_sm90(d)]
    if not compiled:
        pytest.skip("this build has no sm90 tactics (CUTLASS_MOE_SM90_TACTICS=OFF)")
    runnable = {d["name"] for d in runner.tactics(1)}
    if torch.cuda.get_device_capability() == (9, 0):
        assert all(d["runnable"] and d["name"] in runnable for d in compiled)
        return
    assert not [d["name"] for d in compiled if d["runnable"] or d["name"] in runnable]
    fc1, fc2 = _layer(8, torch.bfloat16, True)
    x, ids, scales = random_tokens(4, HIDDEN, 8, 2, torch.bfloat16, 12, DEVICE)
    other = _default(runner, 2, ActivationType.Swiglu, 1.0)
    with pytest.raises(ValueError):
        cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                          tactics=(compiled[0]["name"], other))
    # The runner's own check names the compute capability.
    swiglu = _ext.activation_to_enum(ActivationType.Swiglu)
    size = int(runner.workspace_size(4, HIDDEN, INTER, 8, 2, swiglu))
    workspace = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="compute capability 9.0"):
        runner.run_moe(4, HIDDEN, INTER, 8, 2, 0, swiglu, x.data_ptr(), ids.data_ptr(),
                       scales.data_ptr(), fc1.data_ptr(), fc2.data_ptr(), 0, 0, 0, 0, 0,
                       out.data_ptr(), workspace.data_ptr(), size, compiled[0]["name"], other,
                       torch.cuda.current_stream().cuda_stream)
