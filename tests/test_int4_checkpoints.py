"""cutlass_moe.int4_checkpoints: GPTQ, AWQ and compressed-tensors int4 importers, and the MoE
assembly of load_int4_experts (CPU).

Each format is packed here by an independent writer built from the format's description (one
Python integer per 32-bit word, built nibble by nibble from the top down), never with the
library's code; the imported weights must dequantise EXACTLY to ``(q - z) * s`` of the values the
test chose. An optional test packs with the real compressed-tensors library when it is installed.
"""

from __future__ import annotations

import pytest
import torch

from cutlass_moe.int4 import dequantize_int4, unpack_int4
from cutlass_moe.int4_checkpoints import (
    Int4Experts,
    awq_to_int4,
    compressed_tensors_to_int4,
    gptq_to_int4,
    load_int4_experts,
)

# ------------------------------------------------------------------ independent writers


def _word(nibbles):
    """The signed int32 value of a word whose nibble i (bits 4i..4i+3) is ``nibbles[i]``."""
    assert len(nibbles) == 8 and all(0 <= v <= 15 for v in nibbles)
    value = 0
    for nibble in reversed(nibbles):  # most significant nibble first
        value = value * 16 + nibble
    return value - 2**32 if value >= 2**31 else value


def _int32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def _write_gptq(q, z, v1_writer=None):
    """GPTQ: qweight [K/8, N] (nibble i of word [r, n] = q[n, 8r+i]), qzeros [K/G, N/8] (nibble i
    of word [g, c] = zero of column 8c+i). ``v1_writer``: None (gptq_v2: the zero itself),
    "gptqmodel" (v1 via GPTQModel: the v2 word minus 0x11111111 modulo 2^32) or "autogptq" (v1
    via AutoGPTQ: each nibble z - 1, which needs z >= 1)."""
    n, k = q.shape
    qt, zl = q.t().tolist(), z.tolist()
    qweight = [[_word([qt[8 * r + i][col] for i in range(8)]) for col in range(n)]
               for r in range(k // 8)]
    qzeros = []
    for g in range(len(zl)):
        row = []
        for c in range(n // 8):
            zs = [zl[g][8 * c + i] for i in range(8)]
            if v1_writer == "autogptq":
                row.append(_word([v - 1 for v in zs]))
            elif v1_writer == "gptqmodel":
                unsigned = (_word(zs) % 2**32 - 0x11111111) % 2**32
                row.append(unsigned - 2**32 if unsigned >= 2**31 else unsigned)
            else:
                row.append(_word(zs))
        qzeros.append(row)
    return _int32(qweight), _int32(qzeros)


_AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i holds column 8c + order[i]


def _write_awq(q, z):
    """AWQ GEMM: qweight [K, N/8], qzeros [K/G, N/8], both packed along N in AWQ's order."""
    n, k = q.shape
    ql, zl = q.tolist(), z.tolist()
    qweight = [[_word([ql[8 * c + _AWQ_PACK_ORDER[i]][kk] for i in range(8)])
                for c in range(n // 8)] for kk in range(k)]
    qzeros = [[_word([zl[g][8 * c + _AWQ_PACK_ORDER[i]] for i in range(8)])
               for c in range(n // 8)] for g in range(len(zl))]
    return _int32(qweight), _int32(qzeros)


def _write_ct(q, z):
    """compressed-tensors pack-quantized: weight_packed [N, K/8] (nibble i of word [n, j] =
    signed q[n, 8j+i] + 8), weight_zero_point [N/8, K/G] packed along N (nibble i of word
    [c, g] = signed zp[8c+i, g] + 8). ``q`` and ``z`` are the unsigned values (signed + 8)."""
    n, k = q.shape
    ql, zt = q.tolist(), z.t().tolist()  # zt [N][K/G]
    packed = [[_word(ql[row][8 * j:8 * j + 8]) for j in range(k // 8)] for row in range(n)]
    zero_point = [[_word([zt[8 * c + i][g] for i in range(8)]) for g in range(len(zt[0]))]
                  for c in range(n // 8)]
    return _int32(packed), _int32(zero_point)


# ------------------------------------------------------------------ random layers


def _random_layer(n, k, group, seed, zeros="random", scale_dtype=torch.float16):
    """``q [N, K]`` (0..15), ``z [K/G, N]`` (true zero points), ``s [K/G, N]``."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    q = torch.randint(0, 16, (n, k), generator=gen)
    if zeros == "random":
        z = torch.randint(0, 16, (groups, n), generator=gen)
    elif zeros == "positive":  # what AutoGPTQ's v1 writer can store
        z = torch.randint(1, 16, (groups, n), generator=gen)
    else:
        z = torch.full((groups, n), 8)
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    return q, z, s


def _expected(q, z, s, dtype=None):
    """``(q - z) * s`` per element, in float64, rounded once to ``dtype`` (default s.dtype)."""
    group = q.shape[1] // s.shape[0]
    s_full = s.double().t().repeat_interleave(group, dim=1)
    z_full = z.double().t().repeat_interleave(group, dim=1)
    return ((q.double() - z_full) * s_full).to(dtype or s.dtype)


def _check(layer, q, z, s, symmetric, dtype=None):
    dtype = dtype or s.dtype
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (q.shape[0], q.shape[1] // 2)
    assert torch.equal(unpack_int4(layer.packed), q.to(torch.uint8))
    assert layer.scales.dtype == dtype and torch.equal(layer.scales, s.to(dtype))
    assert layer.group_size == q.shape[1] // s.shape[0]
    if symmetric:
        assert layer.zeros is None
    else:
        assert layer.zeros.dtype == dtype and torch.equal(layer.zeros, z.to(dtype))
    assert torch.equal(dequantize_int4(*layer), _expected(q, z, s.to(dtype)))
    assert torch.equal(dequantize_int4(*layer, dtype=torch.float64), _expected(q, z, s.to(dtype),
                                                                               torch.float64))


# (N, K, G): 3 and 5 groups, the documented group sizes, per-channel (G = K).
SHAPES = [(64, 96, 32), (72, 160, 32), (64, 256, 64), (136, 256, 128), (48, 224, 224)]
SHAPE_IDS = [f"N{n}-K{k}-G{g}" for n, k, g in SHAPES]


# ------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("n,k,group", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("writer", ["gptq_v2", "gptqmodel", "autogptq"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq(n, k, group, writer, symmetric):
    zeros = "eight" if symmetric else ("positive" if writer == "autogptq" else "random")
    q, z, s = _random_layer(n, k, group, seed=n + k + group, zeros=zeros)
    qweight, qzeros = _write_gptq(q, z, None if writer == "gptq_v2" else writer)
    fmt = "gptq_v2" if writer == "gptq_v2" else "gptq"
    if symmetric:  # the words every symmetric checkpoint holds
        assert (qzeros == _word([7] * 8 if fmt == "gptq" else [8] * 8)).all()
    g_idx = torch.arange(k, dtype=torch.int32) // group
    layer = gptq_to_int4(qweight, qzeros, s, g_idx, checkpoint_format=fmt)
    _check(layer, q, z, s, symmetric)
    # g_idx is optional; without qzeros the layer is symmetric.
    assert torch.equal(gptq_to_int4(qweight, qzeros, s, checkpoint_format=fmt).packed,
                       layer.packed)
    if symmetric:
        assert gptq_to_int4(qweight, None, s).zeros is None


def test_gptq_v1_zero_points_of_zero():
    """z = 0 in v1 is -1 stored: GPTQModel's writer borrows from the next nibble (a word minus
    0x11111111); read back exactly, in every nibble position, next to z = 15."""
    q, z, s = _random_layer(64, 64, 32, seed=1)
    z[0, :8] = 0  # a whole word of zeros
    z[1, 8:16] = torch.tensor([0, 15, 0, 15, 0, 15, 0, 15])
    z[1, 16:24] = torch.tensor([15, 0, 0, 15, 15, 0, 0, 0])
    qweight, qzeros = _write_gptq(q, z, "gptqmodel")
    _check(gptq_to_int4(qweight, qzeros, s), q, z, s, symmetric=False)


def test_gptq_conventions_differ_by_one():
    """The same words read as v1 and as v2 give zero points one apart (where no nibble wraps)."""
    q, z, s = _random_layer(64, 64, 32, seed=2, zeros="positive")
    z = z.clamp_max(14)
    qweight, qzeros = _write_gptq(q, z)  # v2 words
    _check(gptq_to_int4(qweight, qzeros, s, checkpoint_format="gptq_v2"), q, z, s, False)
    _check(gptq_to_int4(qweight, qzeros, s, checkpoint_format="gptq"), q, z + 1, s, False)


def test_gptq_scale_dtype_conversion():
    q, z, s = _random_layer(64, 128, 32, seed=3)
    qweight, qzeros = _write_gptq(q, z)
    for dtype in (torch.bfloat16, torch.float32):
        layer = gptq_to_int4(qweight, qzeros, s, checkpoint_format="gptq_v2", dtype=dtype)
        _check(layer, q, z, s, symmetric=False, dtype=dtype)


def test_gptq_act_order_is_refused():
    q, z, s = _random_layer(64, 128, 32, seed=4)
    qweight, qzeros = _write_gptq(q, z, "gptqmodel")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(4))
    g_idx = (perm // 32).to(torch.int32)  # desc_act: groups follow a permutation of K
    with pytest.raises(NotImplementedError, match=r"layer\.g_idx is not arange\(K\) // G "
                                                  r"\(element \d+ is in group \d, not \d\): the "
                                                  r"checkpoint was quantised with desc_act=True"):
        gptq_to_int4(qweight, qzeros, s, g_idx, name="layer")
    with pytest.raises(NotImplementedError, match="activations permuted the same way"):
        gptq_to_int4(qweight, qzeros, s, g_idx)
    # Static groups with desc_act keep g_idx = arange(K) // G: accepted.
    gptq_to_int4(qweight, qzeros, s, torch.arange(128) // 32)


@pytest.mark.parametrize("change,match", [
    (lambda t: {**t, "qweight": t["qweight"].to(torch.int64)},
     r"up\.qweight must be int32 \[K/8, N\] .*got int64 \[12, 64\]"),
    (lambda t: {**t, "qweight": t["qweight"][0]}, r"up\.qweight must be int32 .*got int32 \[64\]"),
    (lambda t: {**t, "scales": t["scales"][:, :32]},
     r"up\.scales must be \[K/G, N\] = \[K/G, 64\] for qweight \[12, 64\], got \[3, 32\]"),
    (lambda t: {**t, "scales": t["scales"].to(torch.int32)},
     "up.scales must be a floating-point tensor, got int32"),
    (lambda t: {**t, "scales": torch.ones(6, 64, dtype=torch.float16),
                "qzeros": torch.zeros(6, 8, dtype=torch.int32)},
     r"up\.scales .*G = 16 is not supported for K = 96"),
    (lambda t: {**t, "qzeros": t["qzeros"][:, :4]},
     r"up\.qzeros must be int32 \[K/G, N/8\] = \[3, 8\], got int32 \[3, 4\]"),
    (lambda t: {**t, "g_idx": t["g_idx"][:10]}, r"up\.g_idx must be an integer \[K\] = \[96\]"),
    (lambda t: {**t, "checkpoint_format": "v2"}, "checkpoint_format must be 'gptq'"),
    (lambda t: {**t, "dtype": torch.int8}, "dtype must be float16"),
])
def test_gptq_errors(change, match):
    q, z, s = _random_layer(64, 96, 32, seed=5)
    qweight, qzeros = _write_gptq(q, z)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": s,
               "g_idx": torch.arange(96) // 32, "name": "up"}
    with pytest.raises(ValueError, match=match):
        gptq_to_int4(**change(tensors))


# ------------------------------------------------------------------ AWQ


@pytest.mark.parametrize("n,k,group", SHAPES, ids=SHAPE_IDS)
def test_awq(n, k, group):
    q, z, s = _random_layer(n, k, group, seed=10 + n + k + group)
    qweight, qzeros = _write_awq(q, z)
    _check(awq_to_int4(qweight, qzeros, s), q, z, s, symmetric=False)


def test_awq_nibble_order_by_hand():
    """Column j of each 8 sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][j]: columns 0..7 of one row
    with values 1..8 make the word 0x86427531 (nibbles 1, 3, 5, 7, 2, 4, 6, 8 from the bottom)."""
    q = torch.zeros(8, 32, dtype=torch.int64)
    q[:, 0] = torch.arange(1, 9)
    z = torch.full((1, 8), 8)
    qweight, qzeros = _write_awq(q, z)
    assert qweight[0, 0].item() == 0x86427531 - 2**32
    layer = awq_to_int4(qweight, qzeros, torch.ones(1, 8, dtype=torch.float16))
    assert unpack_int4(layer.packed)[:, 0].tolist() == list(range(1, 9))
    assert layer.zeros is None  # all zero points 8: the symmetric kernels


def test_awq_symmetric_and_dtype():
    q, z, s = _random_layer(64, 128, 64, seed=11, zeros="eight")
    qweight, qzeros = _write_awq(q, z)
    _check(awq_to_int4(qweight, qzeros, s, dtype=torch.bfloat16), q, z, s, True, torch.bfloat16)


@pytest.mark.parametrize("change,match", [
    (lambda t: {**t, "qweight": t["qweight"].t().contiguous()},
     r"w\.scales must be \[K/G, N\] = \[K/G, 768\]"),
    (lambda t: {**t, "qweight": t["qweight"].float()},
     r"w\.qweight must be int32 \[K, N/8\] .*got float32"),
    (lambda t: {**t, "qzeros": t["qzeros"].t().contiguous()},
     r"w\.qzeros must be int32 \[K/G, N/8\] = \[3, 8\], got int32 \[8, 3\]"),
    (lambda t: {**t, "qzeros": None}, r"w\.qzeros must be int32 .*got NoneType"),
    (lambda t: {**t, "scales": t["scales"][:2]}, r"w\.scales .*G = 48 is not supported"),
])
def test_awq_errors(change, match):
    q, z, s = _random_layer(64, 96, 32, seed=12)
    qweight, qzeros = _write_awq(q, z)
    with pytest.raises(ValueError, match=match):
        awq_to_int4(**change({"qweight": qweight, "qzeros": qzeros, "scales": s, "name": "w"}))


# ------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("n,k,group", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_compressed_tensors(n, k, group, symmetric, scale_dtype):
    q, z, s = _random_layer(n, k, group, seed=20 + n + k + group,
                            zeros="eight" if symmetric else "random", scale_dtype=scale_dtype)
    packed, zero_point = _write_ct(q, z)
    weight_scale = s.t().contiguous()  # [N, K/G]
    shape = torch.tensor([n, k])
    layer = compressed_tensors_to_int4(packed, weight_scale, None if symmetric else zero_point,
                                       shape)
    _check(layer, q, z, s, symmetric)
    if not symmetric:  # older compressed-tensors: unpacked signed zero points [N, K/G]
        unpacked = (z - 8).t().to(torch.int8)
        _check(compressed_tensors_to_int4(packed, weight_scale, unpacked, [n, k]), q, z, s, False)
    else:  # a stored zero point of 0 everywhere is symmetric too
        assert compressed_tensors_to_int4(packed, weight_scale, zero_point).zeros is None


def test_compressed_tensors_by_hand():
    """Signed -8..7 stored with +8, element i in nibble i: [-8, -7, 0, 1, 2, 3, 4, 7] is the
    word 0xFCBA9810."""
    signed = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7] * 4] * 8)
    packed, _ = _write_ct(signed + 8, torch.full((1, 8), 8))
    assert packed[0, 0].item() == 0xFCBA9810 - 2**32
    layer = compressed_tensors_to_int4(packed, torch.full((8, 1), 0.5, dtype=torch.bfloat16))
    assert layer.zeros is None and layer.group_size == 32
    assert dequantize_int4(*layer)[0, :8].tolist() == [-4.0, -3.5, 0, 0.5, 1, 1.5, 2, 3.5]


def test_compressed_tensors_act_order_group():
    q, z, s = _random_layer(64, 128, 32, seed=21)
    packed, zero_point = _write_ct(q, z)
    g_idx = torch.arange(128) // 32
    layer = compressed_tensors_to_int4(packed, s.t(), zero_point, None, g_idx)
    _check(layer, q, z, s, False)
    with pytest.raises(NotImplementedError, match=r'weight_g_idx is not .*actorder="group"'):
        compressed_tensors_to_int4(packed, s.t(), zero_point, None, g_idx.flip(0))


@pytest.mark.parametrize("change,match", [
    (lambda t: {**t, "weight_shape": [64, 100]},
     r"l\.weight_shape \[64, 100\] does not match weight_packed \[64, 12\] .*K must fill whole"),
    (lambda t: {**t, "weight_shape": [64]}, r"l\.weight_shape must be \(N, K\), got \[64\]"),
    (lambda t: {**t, "weight_shape": "64x96"}, r"l\.weight_shape must be \(N, K\), got str"),
    (lambda t: {**t, "weight_packed": t["weight_packed"].to(torch.uint8)},
     r"l\.weight_packed must be int32 \[N, K/8\]"),
    (lambda t: {**t, "weight_scale": t["weight_scale"].t()},
     r"l\.weight_scale must be \[N, K/G\] = \[64, K/G\] \(channel: \[64, 1\]\), got \[3, 64\]"),
    (lambda t: {**t, "weight_scale": t["weight_scale"][:, :2]},
     r"l\.weight_scale \(transposed\) .*G = 48 is not supported for K = 96"),
    (lambda t: {**t, "weight_zero_point": t["weight_zero_point"][:4]},
     (r"l\.weight_zero_point must be int32 \[ceil\(N/8\), K/G\] = \[8, 3\] \(packed along N\) "
      r"or \[N, K/G\] = \[64, 3\] \(unpacked\), got int32 \[4, 3\]")),
    (lambda t: {**t, "weight_zero_point": torch.full((64, 3), 8, dtype=torch.int8)},
     r"l\.weight_zero_point holds 8\.0; unpacked int4 zero points must be integers in -8\.\.7"),
    (lambda t: {**t, "weight_zero_point": torch.full((64, 3), 0.5)}, "holds 0.5"),
])
def test_compressed_tensors_errors(change, match):
    q, z, s = _random_layer(64, 96, 32, seed=22)
    packed, zero_point = _write_ct(q, z)
    tensors = {"weight_packed": packed, "weight_scale": s.t(), "weight_zero_point": zero_point,
               "weight_shape": [64, 96], "name": "l"}
    with pytest.raises(ValueError, match=match):
        compressed_tensors_to_int4(**change(tensors))


def _ct_packer():
    """compressed-tensors' own pack_to_int32 (its module moved between versions), or skip."""
    pytest.importorskip("compressed_tensors")
    for module in ("compressed_tensors.compressors.pack_quantized.helpers",
                   "compressed_tensors.compressors.quantized_compressors.pack_quantized"):
        try:
            return __import__(module, fromlist=["pack_to_int32"]).pack_to_int32
        except (ImportError, AttributeError):
            continue
    pytest.skip("this compressed-tensors has no pack_to_int32")


@pytest.mark.parametrize("group", [32, 128, None], ids=["G32", "G128", "channel"])
def test_compressed_tensors_real_packer(group):
    """Packed by the installed compressed-tensors (weights along K, zero points along N with
    packed_dim=0), imported here: exact."""
    pack_to_int32 = _ct_packer()
    n, k = 72, 256
    g = k if group is None else group
    gen = torch.Generator().manual_seed(23)
    signed = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    zp = torch.randint(-8, 8, (n, k // g), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // g, generator=gen) + 0.1).to(torch.bfloat16)
    layer = compressed_tensors_to_int4(pack_to_int32(signed, 4),
                                       scale, pack_to_int32(zp, 4, packed_dim=0),
                                       torch.tensor([n, k]))
    expected = ((signed.double() - zp.double().repeat_interleave(g, dim=1))
                * scale.double().repeat_interleave(g, dim=1)).to(torch.bfloat16)
    assert torch.equal(dequantize_int4(*layer), expected)
    symmetric = compressed_tensors_to_int4(pack_to_int32(signed, 4), scale)
    assert symmetric.zeros is None
    expected = (signed.double() * scale.double().repeat_interleave(g, dim=1)).to(torch.bfloat16)
    assert torch.equal(dequantize_int4(*symmetric), expected)


# ------------------------------------------------------------------ load_int4_experts

PREFIX = "model.layers.7.mlp.experts"
H, I = 160, 96  # fc1: K = H = 5 groups of 32; fc2: K = I = 3 groups of 32


def _checkpoint(fmt, num_experts=3, group=32, symmetric=(), names=("gate_proj", "up_proj",
                                                                      "down_proj"),
                writer="gptqmodel", scale_dtype=torch.float16):
    """A state dict of ``num_experts`` experts and, per (expert, projection), the chosen
    ``(q, z, s)``. ``symmetric``: the (expert, projection) pairs stored with z = 8 (for
    compressed-tensors: without a zero point)."""
    state, chosen = {}, {}
    gate, up, down = names
    for e in range(num_experts):
        for proj, (n, k) in ((gate, (I, H)), (up, (I, H)), (down, (H, I))):
            sym = symmetric == "all" or (e, proj) in symmetric
            q, z, s = _random_layer(n, k, group, seed=100 * e + len(proj) + n,
                                    zeros="eight" if sym else "random", scale_dtype=scale_dtype)
            chosen[e, proj] = (q, z, s)
            key = f"{PREFIX}.{e}.{proj}"
            if fmt == "gptq":
                qweight, qzeros = _write_gptq(q, z, writer)
                state.update({f"{key}.qweight": qweight, f"{key}.qzeros": qzeros,
                              f"{key}.scales": s,
                              f"{key}.g_idx": torch.arange(k, dtype=torch.int32) // group,
                              f"{key}.bias": torch.zeros(n)})
            elif fmt == "awq":
                qweight, qzeros = _write_awq(q, z)
                state.update({f"{key}.qweight": qweight, f"{key}.qzeros": qzeros,
                              f"{key}.scales": s})
            else:
                packed, zero_point = _write_ct(q, z)
                state.update({f"{key}.weight_packed": packed, f"{key}.weight_scale": s.t(),
                              f"{key}.weight_shape": torch.tensor([n, k])})
                if not sym:
                    state[f"{key}.weight_zero_point"] = zero_point
    state["model.layers.7.mlp.gate.weight"] = torch.zeros(num_experts, H)
    return state, chosen


def _check_experts(experts, chosen, num_experts, zeros_expected, names=("gate_proj", "up_proj",
                                                                         "down_proj"),
                   dtype=torch.float16):
    gate, up, down = names
    assert isinstance(experts, Int4Experts)
    assert experts.fc1_weights.shape == (num_experts, 2 * I, H // 2)
    assert experts.fc2_weights.shape == (num_experts, H, I // 2)
    assert experts.fc1_scales.shape == (num_experts, H // 32, 2 * I)
    assert experts.fc2_scales.shape == (num_experts, I // 32, H)
    assert (experts.fc1_group_size, experts.fc2_group_size) == (32, 32)
    assert experts.fc1_scales.dtype == experts.fc2_scales.dtype == dtype
    assert (experts.fc1_zeros is not None) == zeros_expected == (experts.fc2_zeros is not None)
    assert len(experts.quant_scales) == (4 if zeros_expected else 2)
    assert experts.quant_scales[0] is experts.fc1_scales
    deq1 = dequantize_int4(experts.fc1_weights, experts.fc1_scales, experts.fc1_zeros,
                           torch.float64)
    deq2 = dequantize_int4(experts.fc2_weights, experts.fc2_scales, experts.fc2_zeros,
                           torch.float64)
    for e in range(num_experts):
        (qu, zu, su), (qg, zg, sg), (qd, zd, sd) = (chosen[e, p] for p in (up, gate, down))
        # fc1 rows: up first, then gate; its scale/zero columns likewise.
        assert torch.equal(unpack_int4(experts.fc1_weights[e]),
                           torch.cat([qu, qg]).to(torch.uint8))
        assert torch.equal(experts.fc1_scales[e], torch.cat([su, sg], dim=1).to(dtype))
        assert torch.equal(deq1[e], torch.cat([_expected(qu, zu, su.to(dtype), torch.float64),
                                               _expected(qg, zg, sg.to(dtype), torch.float64)]))
        assert torch.equal(unpack_int4(experts.fc2_weights[e]), qd.to(torch.uint8))
        assert torch.equal(deq2[e], _expected(qd, zd, sd.to(dtype), torch.float64))
        if zeros_expected:  # z = 8 materialised where a projection is symmetric
            assert torch.equal(experts.fc1_zeros[e], torch.cat([zu, zg], dim=1).to(dtype))
            assert torch.equal(experts.fc2_zeros[e], zd.to(dtype))


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
@pytest.mark.parametrize("symmetric", ["all", (), ((0, "gate_proj"), (1, "gate_proj"),
                                                    (2, "gate_proj"), (0, "down_proj")),
                                       ((2, "down_proj"),)],
                         ids=["sym", "asym", "gates-sym", "one-asym"])
def test_load_int4_experts(fmt, symmetric):
    if symmetric == ((2, "down_proj"),):  # every projection symmetric but expert 2's down
        everything = {(e, p) for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")}
        symmetric = tuple(everything - {(2, "down_proj")})
    state, chosen = _checkpoint(fmt, symmetric=symmetric)
    experts = load_int4_experts(state, PREFIX, 3, fmt)
    _check_experts(experts, chosen, 3, zeros_expected=symmetric != "all")


def test_load_gptq_formats_and_names():
    """Mixtral's names (w1 gate, w3 up, w2 down), GPTQ v2, a trailing dot in the prefix and a
    requested dtype."""
    names = ("w1", "w3", "w2")
    state, chosen = _checkpoint("gptq", names=names, writer=None)
    experts = load_int4_experts(state, PREFIX + ".", 3, "gptq", gate="w1", up="w3", down="w2",
                                checkpoint_format="gptq_v2", dtype=torch.bfloat16)
    _check_experts(experts, chosen, 3, True, names=names, dtype=torch.bfloat16)
    # The same words read as v1 are not the same weights.
    v1 = load_int4_experts(state, PREFIX, 3, "gptq", gate="w1", up="w3", down="w2")
    assert not torch.equal(v1.fc1_zeros, experts.fc1_zeros.half())


def test_load_compressed_tensors_aliases_and_bf16_scales():
    state, chosen = _checkpoint("compressed-tensors", scale_dtype=torch.bfloat16)
    for fmt in ("compressed_tensors", "pack-quantized"):
        experts = load_int4_experts(state, PREFIX, 3, fmt)
        _check_experts(experts, chosen, 3, True, dtype=torch.bfloat16)


def test_load_non_gated_experts():
    state, chosen = _checkpoint("awq", num_experts=2)
    experts = load_int4_experts(state, PREFIX, 2, "awq", gate=None)
    assert experts.fc1_weights.shape == (2, I, H // 2)
    for e in range(2):
        q, z, s = chosen[e, "up_proj"]
        assert torch.equal(unpack_int4(experts.fc1_weights[e]), q.to(torch.uint8))
        assert torch.equal(experts.fc1_zeros[e], z.half())
        assert torch.equal(experts.fc1_scales[e], s)


def test_load_fewer_experts_than_stored():
    state, chosen = _checkpoint("gptq")
    experts = load_int4_experts(state, PREFIX, 2, "gptq")
    _check_experts(experts, chosen, 2, True)


def test_load_missing_tensors():
    state, _ = _checkpoint("gptq")
    with pytest.raises(KeyError, match=r"experts\.3\.up_proj\.qweight' is missing"):
        load_int4_experts(state, PREFIX, 4, "gptq")  # one expert more than stored
    del state[f"{PREFIX}.1.down_proj.qzeros"]
    with pytest.raises(KeyError, match=rf"'{PREFIX}\.1\.down_proj\.qzeros' is missing from the "
                                       r"state dict \(gptq layers need qweight, qzeros, scales\)"):
        load_int4_experts(state, PREFIX, 3, "gptq")
    with pytest.raises(KeyError, match=r"model\.layers\.7\.mlp\.expert\.0\.up_proj\.qweight' is "
                                       r"missing .*; no key starts with 'model\.layers\.7\.mlp"
                                       r"\.expert\.' \(check the prefix\)"):
        load_int4_experts(state, "model.layers.7.mlp.expert", 3, "gptq")
    ct, _ = _checkpoint("compressed-tensors")
    del ct[f"{PREFIX}.2.gate_proj.weight_scale"]
    with pytest.raises(KeyError, match=r"2\.gate_proj\.weight_scale' is missing .*"
                                       r"\(compressed-tensors layers need weight_packed, "
                                       r"weight_scale\)"):
        load_int4_experts(ct, PREFIX, 3, "compressed-tensors")


def test_load_bad_tensors_are_named():
    state, _ = _checkpoint("awq")
    state[f"{PREFIX}.2.up_proj.scales"] = state[f"{PREFIX}.2.up_proj.scales"].float()
    with pytest.raises(ValueError, match=rf"{PREFIX}\.2\.up_proj has torch\.float32 scales but "
                                         rf"{PREFIX}\.0\.up_proj has torch\.float16; pass dtype="):
        load_int4_experts(state, PREFIX, 3, "awq")
    experts = load_int4_experts(state, PREFIX, 3, "awq", dtype=torch.float16)
    assert experts.fc1_scales.dtype == torch.float16
    # An expert whose up projection has another shape.
    q, z, s = _random_layer(64, H, 32, seed=5)
    qweight, qzeros = _write_awq(q, z)
    state[f"{PREFIX}.1.up_proj.qweight"] = qweight
    state[f"{PREFIX}.1.up_proj.qzeros"] = qzeros
    state[f"{PREFIX}.1.up_proj.scales"] = s
    with pytest.raises(ValueError, match=rf"{PREFIX}\.1\.up_proj has weights \[64, 80\] \(kernel "
                                         rf"layout\) but {PREFIX}\.0\.up_proj has \[96, 80\]: "
                                         "up_proj and gate_proj of every expert must have one"):
        load_int4_experts(state, PREFIX, 3, "awq", dtype=torch.float16)
    state, _ = _checkpoint("gptq")
    state[f"{PREFIX}.0.down_proj.qweight"] = state[f"{PREFIX}.0.down_proj.qweight"].float()
    with pytest.raises(ValueError, match=rf"{PREFIX}\.0\.down_proj\.qweight must be int32"):
        load_int4_experts(state, PREFIX, 3, "gptq")


def test_load_group_sizes_per_gemm_and_mismatches():
    state, _ = _checkpoint("gptq", group=H)  # fc1 per-channel (G = H) ...
    down, _ = _checkpoint("gptq", group=32)  # ... fc2 in groups of 32
    state.update({key: value for key, value in down.items() if ".down_proj." in key})
    experts = load_int4_experts(state, PREFIX, 3, "gptq")
    assert (experts.fc1_group_size, experts.fc2_group_size) == (H, 32)
    assert experts.fc1_scales.shape == (3, 1, 2 * I)
    # gate and up must share fc1's group size.
    state[f"{PREFIX}.0.gate_proj.scales"] = down[f"{PREFIX}.0.gate_proj.scales"]
    state[f"{PREFIX}.0.gate_proj.qzeros"] = down[f"{PREFIX}.0.gate_proj.qzeros"]
    state.pop(f"{PREFIX}.0.gate_proj.g_idx")
    with pytest.raises(ValueError, match=r"0\.gate_proj has scales \[5, 96\] .* but "
                                         r".*0\.up_proj has \[1, 96\]"):
        load_int4_experts(state, PREFIX, 3, "gptq")


def test_load_alignment_is_checked():
    """I = 48 is no multiple of 32: refused at load time, naming the layer."""
    state = {}
    for proj, (n, k) in (("gate_proj", (48, 64)), ("up_proj", (48, 64)), ("down_proj", (64, 48))):
        q, z, s = _random_layer(n, k, k, seed=n)
        qweight, qzeros = _write_gptq(q, z)
        state.update({f"p.0.{proj}.qweight": qweight, f"p.0.{proj}.qzeros": qzeros,
                      f"p.0.{proj}.scales": s})
    with pytest.raises(ValueError, match=r"the experts under 'p' do not make an int4 MoE layer: "
                                         r"check_int4_layer: I = 48 must be a multiple of 32"):
        load_int4_experts(state, "p", 1, "gptq", checkpoint_format="gptq_v2")


def test_load_act_order_is_refused():
    state, _ = _checkpoint("gptq", num_experts=1)
    state[f"{PREFIX}.0.down_proj.g_idx"] = state[f"{PREFIX}.0.down_proj.g_idx"].flip(0)
    with pytest.raises(NotImplementedError, match=rf"{PREFIX}\.0\.down_proj\.g_idx is not "
                                                  r"arange\(K\) // G .*desc_act=True"):
        load_int4_experts(state, PREFIX, 1, "gptq")


@pytest.mark.parametrize("kwargs,match", [
    ({"fmt": "marlin"}, "fmt must be one of 'gptq', 'awq', 'compressed-tensors', got 'marlin'"),
    ({"fmt": "awq", "checkpoint_format": "gptq"}, "checkpoint_format applies to fmt='gptq' only"),
    ({"fmt": "gptq", "checkpoint_format": "gptq_v3"}, "checkpoint_format must be 'gptq'"),
    ({"fmt": "gptq", "num_experts": 0}, "num_experts must be a positive int, got 0"),
    ({"fmt": "gptq", "num_experts": 2.0}, "num_experts must be a positive int, got 2.0"),
    ({"fmt": "gptq", "dtype": torch.int32}, "dtype must be float16"),
])
def test_load_argument_errors(kwargs, match):
    state, _ = _checkpoint("gptq", num_experts=1)
    args = {"num_experts": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_int4_experts(state, PREFIX, args.pop("num_experts"), args.pop("fmt"), **args)
