"""W4A16 on a GPU through the public call: fp16/bf16 activations x int4 group-wise expert weights
(``use_w4_group_scaling=True``), against ``reference_moe`` on the dequantised weights.

The weights come from :func:`cutlass_moe.int4.quantize_int4_groupwise` (random N(0, 1/fan_in)
weights, never zeros), and the reference runs on :func:`cutlass_moe.int4.dequantize_int4` of
them: ``(q - z) * s`` rounded once to the activation dtype, which is what the kernels compute
with. Relative L2 bounds: bf16 1e-2, fp16 2e-3 (recorded under ``<dtype>_x_int4``). Every output
buffer is poisoned with NaN before the run.

Shapes: K (H for fc1, I for fc2) is a multiple of 32 with residues per 64-wide K step (H = 160,
I = 96: 5 and 3 groups of 32), and N (2I or I, H) leaves partial column tiles; group sizes 32,
64, 128 and per-channel, symmetric and asymmetric, the two GEMMs with different group sizes.
The last test imports a GPTQ checkpoint packed here and runs it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch

from _helpers import captured_graph, descriptors, random_tokens, record_error, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe, tactics
from cutlass_moe.int4 import (
    dequantize_int4,
    quantize_int4_groupwise,
    quantize_moe_weights_int4,
    unpack_int4,
)
from cutlass_moe.int4_checkpoints import load_int4_experts

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: The weight-format tag of the int4 runner (cutlass_moe._ext: C++ DType kInt4 = 4).
INT4 = "int4"
GATED = (ActivationType.Swiglu, ActivationType.Geglu)


class Layer(NamedTuple):
    packed: tuple[torch.Tensor, torch.Tensor]  # uint8 [E, N1, H/2], [E, H, I/2]
    quant: list[torch.Tensor]  # [s1, s2] or [s1, s2, z1, z2], activation dtype
    deq: tuple[torch.Tensor, torch.Tensor]  # float32 of the dtype-rounded dequantised weights


@functools.lru_cache(maxsize=16)
def _layer(num_experts, hidden, inter, gated, dtype, groups, symmetric, seed=0):
    """A quantised layer on the GPU; ``groups = (G1, G2)`` (None: per-channel)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n1 = 2 * inter if gated else inter
    fc1 = torch.randn(num_experts, n1, hidden, device=DEVICE, generator=gen) * hidden**-0.5
    fc2 = torch.randn(num_experts, hidden, inter, device=DEVICE, generator=gen) * inter**-0.5
    p1, p2, quant = quantize_moe_weights_int4(fc1.to(dtype), fc2.to(dtype), groups, symmetric)
    assert all(t.dtype == dtype and t.is_cuda for t in quant)
    z1, z2 = (None, None) if symmetric else quant[2:]
    deq = (dequantize_int4(p1, quant[0], z1).float(), dequantize_int4(p2, quant[1], z2).float())
    return Layer((p1, p2), quant, deq)


def _tokens(num_tokens, hidden, num_experts, top_k, dtype, seed):
    return random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 4000 + seed, DEVICE)


def _run(x, ids, route, layer, names=None, out_dtype=None, **kwargs):
    """The int4 call with a NaN-poisoned ``output=``; checks it is returned and fully written."""
    output = torch.full(x.shape, float("nan"), dtype=out_dtype or x.dtype, device=DEVICE)
    result = cutlass_fused_moe(x, ids, route, *layer.packed, output.dtype, output=output,
                               quant_scales=layer.quant, use_w4_group_scaling=True,
                               tactics=names, **kwargs)
    assert isinstance(result, list) and result[0] is output
    assert not output.isnan().any(), f"{names}: some output elements were not written"
    return output


def _error(x, ids, route, layer, names=None, ref=None, out_dtype=None, **kwargs):
    """Relative L2 error of the call against reference_moe on the dequantised weights."""
    out = _run(x, ids, route, layer, names, out_dtype, **kwargs)
    if ref is None:
        ref = reference_moe(x, ids, route, *layer.deq, **kwargs)
    return record_error(f"{str(x.dtype)[6:]}_x_int4", rel_l2(out.float(), ref))


def _check(x, ids, route, layer, names=None, **kwargs):
    err = _error(x, ids, route, layer, names, **kwargs)
    assert err <= TOLERANCE[x.dtype], f"relative L2 error vs the dequantised reference {err:.3g}"


# ------------------------------------------------------------------ every int4 tactic

# (H, I, (G1, G2), symmetric): K residues per 64-wide step and odd group counts (5 and 3 groups
# of 32), per-channel, and the two GEMMs with different group sizes (3 x 128 / 4 x 64, ...).
_CONFIGS = [(160, 96, (32, 32), False), (160, 96, (None, None), True),
            (384, 256, (128, 64), True), (384, 256, (64, 128), False)]


def _activations(desc, gemm):
    if gemm == 2:
        return [ActivationType.Swiglu]
    if desc.get("gated"):  # a gated GEMM1 (the gated decode tactics): gated activations only
        return [a for a in GATED if tactics.supports_activation(desc, a)]
    return [ActivationType.Swiglu, ActivationType.Relu]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", [1, 2])
def test_every_int4_tactic(monkeypatch, dtype, gemm):
    """Each int4 tactic the runner lists for one GEMM (tensor-core and decode ones), the other
    GEMM on its default, forced through ``tactics=(name1, name2)``, over every config of
    _CONFIGS and decode- and prefill-sized calls."""
    monkeypatch.setenv(tactics.DECODE_ENV, "1")
    runner = _ext.get_runner(dtype, INT4, dtype)
    descs = descriptors(runner, gemm)
    assert descs, f"no int4 GEMM{gemm} tactic"
    assert all("_int4_" in str(d["name"]) and d.get("weight_dtype") == "int4" for d in descs)
    assert any(d.get("decode") for d in descs), "no int4 decode tactic"
    refs = {}
    failures = []
    for desc in descs:
        for activation in _activations(desc, gemm):
            for hidden, inter, groups, symmetric in _CONFIGS:
                layer = _layer(4, hidden, inter, activation in GATED, dtype, groups, symmetric)
                other = [d for d in descriptors(runner, 3 - gemm)
                         if tactics.supports_activation(d, activation)]
                for num_tokens in (1, 7, 33) if desc.get("decode") else (1, 7, 300):
                    other_name = tactics.default_tactic(other, num_tokens * 2 / 4)
                    names = ((desc["name"], other_name) if gemm == 1
                             else (other_name, desc["name"]))
                    x, ids, route = _tokens(num_tokens, hidden, 4, 2, dtype, num_tokens)
                    key = (hidden, groups, symmetric, activation, num_tokens)
                    if key not in refs:
                        refs[key] = reference_moe(x, ids, route, *layer.deq, activation)
                    label = f"{names} {activation.name} H={hidden} G={groups} T={num_tokens}"
                    try:
                        err = _error(x, ids, route, layer, names, refs[key],
                                     activation_type=activation)
                    except (RuntimeError, ValueError, AssertionError) as exc:  # report them all
                        failures.append(f"{label}: {exc}")
                        continue
                    if not err <= TOLERANCE[dtype]:
                        failures.append(f"{label}: rel err {err:.3g}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ groups, shapes, tokens

# group -> (H, I): odd group counts where they fit (H/G, I/G).
_GROUP_SHAPES = {32: (160, 96), 64: (192, 320), 128: (384, 640), None: (224, 96)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128, None], ids=["G32", "G64", "G128", "channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_group_sizes(dtype, group, symmetric):
    hidden, inter = _GROUP_SHAPES[group]
    layer = _layer(8, hidden, inter, True, dtype, (group, group), symmetric, seed=1)
    for num_tokens in (1, 7, 300):
        x, ids, route = _tokens(num_tokens, hidden, 8, 2, dtype, num_tokens)
        _check(x, ids, route, layer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 300, 4096])
def test_token_counts(dtype, num_tokens):
    layer = _layer(8, 384, 256, True, dtype, (128, 64), False, seed=2)
    x, ids, route = _tokens(num_tokens, 384, 8, 2, dtype, num_tokens)
    if num_tokens == 0:
        out = cutlass_fused_moe(x, ids, route, *layer.packed, dtype, quant_scales=layer.quant,
                                use_w4_group_scaling=True)[0]
        assert out.shape == (0, 384) and out.is_cuda
        return
    _check(x, ids, route, layer)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_output_and_plain_activation(dtype):
    layer = _layer(8, 160, 96, False, dtype, (32, None), False, seed=3)
    x, ids, route = _tokens(65, 160, 8, 2, dtype, 65)
    _check(x, ids, route, layer, out_dtype=torch.float32, activation_type=ActivationType.Relu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_edge_cases(dtype):
    """Empty experts, all tokens on one expert, k = E, and ids outside this rank."""
    layer = _layer(4, 384, 256, True, dtype, (128, 128), False, seed=4)
    x, ids, route = _tokens(300, 384, 4, 2, dtype, 300)
    two = ids.clone()
    two[:, 0], two[:, 1] = 2, 3  # experts 0 and 1 get no rows
    _check(x, two, route, layer)
    one = torch.full_like(ids[:, :1], 1)  # every token on expert 1
    _check(x, one, torch.ones_like(route[:, :1]), layer)
    x4, ids4, route4 = _tokens(129, 384, 4, 4, dtype, 129)  # k = E: every expert, every token
    assert (ids4.sort(dim=1).values == torch.arange(4, device=DEVICE)).all()
    _check(x4, ids4, route4, layer)
    outside = ids.clone()
    outside[0, 0], outside[1, 1], outside[2, :] = -1, 4, 1000  # token 2: no valid choice
    _check(x, outside, route, layer)
    assert (_run(x, outside, route, layer)[2] == 0).all()


# ------------------------------------------------------------------ graphs and repeats


def _graph_matches_eager(layer, hidden, dtype, names):
    x, ids, route = _tokens(64, hidden, 8, 2, dtype, 64)
    static = (x.clone(), ids.clone(), route.clone())
    static_out = torch.empty(64, hidden, dtype=dtype, device=DEVICE)
    kwargs = {"quant_scales": layer.quant, "use_w4_group_scaling": True, "tactics": names}

    def call():
        cutlass_fused_moe(*static, *layer.packed, dtype, output=static_out, **kwargs)

    graph = captured_graph(call)
    for seed in (65, 66):
        x, ids, route = _tokens(64, hidden, 8, 2, dtype, seed)
        for dst, src in zip(static, (x, ids, route)):
            dst.copy_(src)
        static_out.fill_(float("nan"))
        graph.replay()
        eager = _run(x, ids, route, layer, names)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), names
        assert torch.equal(_run(x, ids, route, layer, names), eager), f"{names}: not repeatable"


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_cuda_graph_capture_matches_eager(symmetric):
    """The default tactics, and a gated decode GEMM1 with a decode GEMM2 when compiled."""
    dtype = torch.bfloat16
    layer = _layer(8, 384, 256, True, dtype, (64, 128), symmetric, seed=5)
    _graph_matches_eager(layer, 384, dtype, None)
    runner = _ext.get_runner(dtype, INT4, dtype)
    gated = [d["name"] for d in descriptors(runner, 1) if d.get("decode") and d.get("gated")]
    decode2 = [d["name"] for d in descriptors(runner, 2) if d.get("decode")]
    if gated and decode2:
        _graph_matches_eager(layer, 384, dtype, (gated[0], decode2[0]))


# ------------------------------------------------------------------ a GPTQ checkpoint


def _gptq_words(values, along):
    """Packs nibble values 8 to an int32 word (value i times 16**i) along dim ``along`` of a
    2-D tensor: GPTQ's qweight (along K = dim 0 of [K, N]) and qzeros (along N = dim 1)."""
    values = values.to(torch.int64)
    if along == 1:
        values = values.t()
    rows, cols = values.shape
    nibbles = values.reshape(rows // 8, 8, cols)
    word = sum(nibbles[:, i] * 16**i for i in range(8))
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word if along == 0 else word.t().contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("checkpoint_format,symmetric", [("gptq", False), ("gptq_v2", True)])
def test_gptq_checkpoint_end_to_end(dtype, checkpoint_format, symmetric):
    """Random weights quantised, written as a GPTQ checkpoint here (fp16 scales, gate/up/down
    per expert), imported with load_int4_experts(dtype=...) and run: the result matches the
    reference on ``(q - z) * s`` of the values written."""
    num_experts, hidden, inter, group = 4, 256, 128, 64
    gen = torch.Generator().manual_seed(6)
    state, weights = {}, {}
    for e in range(num_experts):
        for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                             ("down_proj", (hidden, inter))):
            w = (torch.randn(n, k, generator=gen) * k**-0.5).half()
            packed, scales, zeros = quantize_int4_groupwise(w, group, symmetric)  # fp16 scales
            q = unpack_int4(packed).to(torch.int64)  # [N, K]
            z = torch.full_like(scales, 8, dtype=torch.int64) if zeros is None else zeros.long()
            qzeros = _gptq_words(z, 1)  # v2: the zero points themselves
            if checkpoint_format == "gptq":  # v1: the v2 word minus 0x11111111 (mod 2^32)
                qzeros = ((qzeros.to(torch.int64) - 0x11111111) % 2**32)
                qzeros = torch.where(qzeros >= 2**31, qzeros - 2**32, qzeros).to(torch.int32)
            key = f"model.layers.0.mlp.experts.{e}.{proj}"
            state.update({f"{key}.qweight": _gptq_words(q.t(), 0), f"{key}.qzeros": qzeros,
                          f"{key}.scales": scales,
                          f"{key}.g_idx": torch.arange(k, dtype=torch.int32) // group})
            group_of = torch.arange(k) // group
            weights[e, proj] = ((q - z[group_of].t()) * scales.to(dtype)[group_of].t().double())
    experts = load_int4_experts(state, "model.layers.0.mlp.experts", num_experts, "gptq",
                                checkpoint_format=checkpoint_format, dtype=dtype)
    assert (experts.fc1_zeros is None) == symmetric
    fc1 = torch.stack([torch.cat([weights[e, "up_proj"], weights[e, "gate_proj"]])
                       for e in range(num_experts)]).to(dtype).float().to(DEVICE)
    fc2 = torch.stack([weights[e, "down_proj"] for e in range(num_experts)])
    fc2 = fc2.to(dtype).float().to(DEVICE)
    layer = Layer((experts.fc1_weights.to(DEVICE), experts.fc2_weights.to(DEVICE)),
                  [t.to(DEVICE) for t in experts.quant_scales], (fc1, fc2))
    for num_tokens in (3, 200):
        x, ids, route = _tokens(num_tokens, hidden, num_experts, 2, dtype, num_tokens)
        _check(x, ids, route, layer)
