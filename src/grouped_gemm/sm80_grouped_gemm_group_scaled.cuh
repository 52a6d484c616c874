// Sm80 grouped GEMM with group-scaled weight-only experts: 16-bit activations x packed int4
// (W4A16), FP8 e4m3 or MXFP4 e2m1 expert weights, dequantised in the mainloop, one problem per
// expert, scheduled on the device (docs/architecture.md, "int4 weights" and "FP8 and MXFP4
// weights").
//
// Math, per expert e:  D_e[M_e, N] = A_e[M_e, K] · W_e[N, K]^T, with W_e[n, k] a function of the
// packed weight q_e[n, k] and the scale s_e[k / G, n] (N contiguous, [K/G, N] per expert):
//   int4   W = (q - z) * s, q an unsigned nibble, s and the optional zero point z in the
//          activation dtype (without zero points z = 8);
//   fp8    W = e4m3(q) * s, s float32;
//   mxfp4  W = e2m1(q) * 2^(x - 127), x the e8m0 scale byte (G = 32).
// Packed weights are [N, K * bits / 8] bytes (K contiguous; 4-bit ones low nibble first); ldb
// counts weights. G, the group size, is a runtime value: a multiple of 32 that divides K (K: per
// channel). Each weight is computed in fp32 (exact for int4: a 5-bit integer times a 16-bit
// scale) and rounded once to the activation dtype, then multiplied on 16-bit tensor cores with
// fp32 accumulation; D is rounded once in the epilogue.
//
// CUTLASS 4.2's 2.x mainloops do not pair 16-bit A with these B types on Sm80, so the mainloop is
// the project's. It reuses CUTLASS's 16-bit x 16-bit building blocks (DefaultMmaCore's
// shared-memory layouts and warp-level tensor-op MMA, and the predicated cp.async iterator for A):
//   - Stages-deep cp.async pipeline: each stage holds the A tile (16-bit, CUTLASS layout), the
//     raw packed B tile (a column's 64 weights contiguous) and, for each 32-long half of the
//     K-tile, one row of scales (int4: and of zero points); a 32-long half lies in one group,
//     since G is a multiple of 32 and K-tiles start at multiples of 32.
//   - Per K-tile, the block dequantises the ready stage's packed tile into a single 16-bit B tile
//     in CUTLASS's crosswise shared-memory layout (one thread per column; int4 by packed 16-bit
//     math, the others in fp32), then the warps run the tile's tensor-core MMAs from shared
//     memory as the stock mainloop does. Dequantisation costs TileN x 64 conversions per K-tile,
//     shared by the TileM rows of the tile.
//   - K-tiles follow CUTLASS's predicated iterator: the first tile covers the residue K % 64
//     (or a full 64), the others full tiles; B, scales and zero points use the same offsets.
// Scheduling is CUTLASS's GemmGroupedProblemVisitor over device-resident problem sizes (no host
// synchronisation), walked by the project's tile loop (tile_loop.cuh, with its tile order).
//
// Alignment (the caller checks): K % 32 == 0, N % 8 == 0 (mxfp4: N % 16, 16-byte rows of scale
// bytes), lda % 8 == 0, ldd % 8 == 0; A, q, s, z and D 16-byte aligned. M_e may be 0 (the
// expert is skipped). Scale pointers must not be null.
//
// Instantiated by generated files (tools/generate_kernels.py); keep this header free of torch and
// pybind11.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cutlass/aligned_buffer.h"
#include "cutlass/arch/memory_sm80.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/gemm_grouped_problem_visitor.h"
#include "cutlass/gemm/threadblock/default_mma_core_sm80.h"
#include "cutlass/layout/matrix.h"
#include "cutlass/matrix_coord.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"
#include "cutlass/transform/threadblock/predicated_tile_access_iterator.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/tactic.h"
#include "grouped_gemm/kernel_setup.cuh"
#include "grouped_gemm/tile_loop.cuh"
#include "grouped_gemm/weight_codes.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

// Eight nibbles (k = 0..7 of a 32-bit word, nibble i at bits 4i) -> eight 16-bit weights
// (q - z) * s in K order, by packed 16-bit math: a nibble pair OR-ed into the mantissas of two
// copies of 2^7 (bf16) or 2^10 (fp16) gives (2^7 + q) exactly, subtracting (2^7 + z) gives
// q - z exactly when z is an integer, and the product with s is rounded once: the same value
// as the fp32 computation. Pairs come out as (k, k + 4) and are permuted into K order.
template <typename Element>
struct PackedDequant;

template <>
struct PackedDequant<cutlass::bfloat16_t> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 pair (128, 128)
  static constexpr float kOffset = 128.0f;
  using Pair = __nv_bfloat162;
  CUTLASS_DEVICE static Pair pair(float x) { return __float2bfloat162_rn(x); }
};

template <>
struct PackedDequant<cutlass::half_t> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 pair (1024, 1024)
  static constexpr float kOffset = 1024.0f;
  using Pair = __half2;
  CUTLASS_DEVICE static Pair pair(float x) { return __float2half2_rn(x); }
};

// s2: the scale twice; c2: (offset + zero) twice, exact for integer zeros (|z| < 2^6).
template <typename Element>
CUTLASS_DEVICE uint4 dequantise8_packed(uint32_t word, typename PackedDequant<Element>::Pair s2,
                                        typename PackedDequant<Element>::Pair c2) {
  using D = PackedDequant<Element>;
  using Pair = typename D::Pair;
  uint32_t r[4];
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < 4; ++i) {
    uint32_t bits = ((word >> (4 * i)) & 0x000F000Fu) | D::kMagic;  // k = i, i + 4
    const Pair q = *reinterpret_cast<const Pair*>(&bits);
    const Pair w = __hmul2(__hsub2(q, c2), s2);
    r[i] = *reinterpret_cast<const uint32_t*>(&w);
  }
  // r[i] holds (k = i, k = i + 4): gather (0,1), (2,3) from the low halves, (4,5), (6,7) from
  // the high halves.
  return make_uint4(__byte_perm(r[0], r[1], 0x5410), __byte_perm(r[2], r[3], 0x5410),
                    __byte_perm(r[0], r[1], 0x7632), __byte_perm(r[2], r[3], 0x7632));
}

// The weight formats of the group-scaled mainloop: bits per weight, the scales' element type,
// whether zero points exist, and the conversion of one column's 32-long K-half into four 16-byte
// vectors of the activation dtype (`words`: the half's packed bytes as 32-bit words).
namespace weight_format {

// Four 16-byte vectors of 8 weights each (a column's 32-long K-half) from their fp32 values
// value(w, j) (vector w, element j), each rounded once to the activation dtype.
template <typename Element, typename Value>
CUTLASS_DEVICE void round_to_vectors(Value value, uint4* out) {
  cutlass::NumericArrayConverter<Element, float, 8> convert;
  CUTLASS_PRAGMA_UNROLL
  for (int w = 0; w < 4; ++w) {
    cutlass::Array<float, 8> v;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) v[j] = value(w, j);
    *reinterpret_cast<cutlass::Array<Element, 8>*>(&out[w]) = convert(v);
  }
}

// int4: unsigned nibbles, scales in the activation dtype, optional zero points (default 8).
template <typename Element>
struct Int4 {
  static constexpr int kBits = 4;
  using Scale = Element;
  static constexpr bool kZeros = true;

  CUTLASS_DEVICE static void dequantise(const uint32_t* words, Scale scale_value,
                                        const Element* zero_value, uint4* out) {
    using D = PackedDequant<Element>;
    const float scale = float(scale_value);
    const float zero = zero_value != nullptr ? float(*zero_value) : 8.0f;
    if (zero == rintf(zero) && fabsf(zero) < 64.0f) {
      const typename D::Pair s2 = D::pair(scale);
      const typename D::Pair c2 = D::pair(D::kOffset + zero);
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < 4; ++w) out[w] = dequantise8_packed<Element>(words[w], s2, c2);
      return;
    }
    // Other zero points: fp32, where q placed in the low mantissa bits of 2^23 is 2^23 + q
    // exactly; q - z is exact in fp32 (2^23 + z would round a fraction away).
    round_to_vectors<Element>(
        [&](int w, int j) {
          const float q =
              __uint_as_float(0x4B000000u | ((words[w] >> (4 * j)) & 0xFu)) - 8388608.0f;
          return (q - zero) * scale;
        },
        out);
  }
};

// FP8 e4m3 (one byte per weight), float32 scales: w = round(e4m3(v) * s) (weight_codes.cuh).
template <typename Element>
struct Fp8E4m3 {
  static constexpr int kBits = 8;
  using Scale = float;
  static constexpr bool kZeros = false;

  CUTLASS_DEVICE static void dequantise(const uint32_t* words, Scale scale, const Element*,
                                        uint4* out) {
    round_to_vectors<Element>(
        [&](int w, int j) { return e4m3_value(words[2 * w + j / 4] >> (8 * (j % 4))) * scale; },
        out);
  }
};

// MXFP4: e2m1 nibbles (low nibble first, as int4), one e8m0 scale 2^(x - 127) per 32 weights
// (weight_codes.cuh).
template <typename Element>
struct Mxfp4 {
  static constexpr int kBits = 4;
  using Scale = uint8_t;
  static constexpr bool kZeros = false;

  CUTLASS_DEVICE static void dequantise(const uint32_t* words, Scale scale_code, const Element*,
                                        uint4* out) {
    const float scale = e8m0_value(scale_code);
    round_to_vectors<Element>([&](int w, int j) { return e2m1_value(words[w] >> (4 * j)) * scale; },
                              out);
  }
};

}  // namespace weight_format

// Device-resident per-problem arrays of a group-scaled grouped GEMM (one entry per problem) and
// the launch-wide group size.
template <typename Element, typename Scale, typename OutputParams>
struct GroupScaledGemmParams {
  OutputParams output_op{};
  Element** ptr_A = nullptr;
  uint8_t** ptr_B = nullptr;      // packed weights [N, K * bits / 8] bytes
  Element** ptr_D = nullptr;
  Scale** ptr_scale = nullptr;    // [K/G, N], never null
  Element** ptr_zero = nullptr;   // int4: [K/G, N] entries, or null entries (zero point 8)
  int64_t* lda = nullptr;
  int64_t* ldb = nullptr;         // in weights (elements), not bytes
  int64_t* ldd = nullptr;
  int group_size = 0;
};

// The mainloop of one output tile: accumulators = A[tile rows, :] * dequant(B)[:, tile columns].
template <typename Element, typename Format_, int TileM, int TileN, int WarpM, int WarpN,
          int Stages>
struct GroupScaledMainloop {
  static_assert(Stages >= 2, "the pipeline needs at least two stages");
  static constexpr int kTileK = 64;
  static constexpr int kHalfK = 32;  // a K-half: one scale (and zero point) row per half
  static constexpr int kBits = Format_::kBits;
  static constexpr int kPackedBytes = kTileK * kBits / 8;  // one column of a packed tile
  static constexpr int kChunkK = 128 / kBits;              // K of one 16-byte packed chunk
  using Format = Format_;
  using Scale = typename Format::Scale;
  static constexpr int kScalesPerChunk = 16 / int(sizeof(Scale));
  static_assert(TileN % kScalesPerChunk == 0, "scale rows are copied in 16-byte chunks");

  using Shape = cutlass::gemm::GemmShape<TileM, TileN, kTileK>;
  using WarpShape = cutlass::gemm::GemmShape<WarpM, WarpN, kTileK>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
  // The 16-bit x 16-bit core: shared-memory layouts, thread maps and the warp-level MMA.
  using Core = cutlass::gemm::threadblock::DefaultMmaCore<
      Shape, WarpShape, InstructionShape, Element, cutlass::layout::RowMajor, Element,
      cutlass::layout::ColumnMajor, float, cutlass::layout::RowMajor,
      cutlass::arch::OpClassTensorOp, Stages, cutlass::arch::OpMultiplyAdd>;
  using WarpCount = typename Core::WarpCount;
  static constexpr int kThreads = 32 * WarpCount::kCount;
  static_assert(WarpCount::kK == 1, "one warp per K-tile slice");

  using Operator = typename Core::MmaPolicy::Operator;
  using FragmentC = typename Operator::FragmentC;
  static constexpr int kWarpGemmIterations = kTileK / InstructionShape::kK;

  // A: global -> shared by cp.async, as CUTLASS's multistage mainloop does.
  using LayoutA = cutlass::layout::RowMajor;
  using ThreadMapA = typename Core::IteratorThreadMapA;
  using AccessTypeA = cutlass::Array<Element, 128 / cutlass::sizeof_bits<Element>::value>;
  using IteratorA = cutlass::transform::threadblock::PredicatedTileAccessIterator<
      cutlass::MatrixShape<TileM, kTileK>, Element, LayoutA, 1, ThreadMapA, AccessTypeA>;
  using SmemLayoutA = typename Core::SmemLayoutA;
  using SmemIteratorA = typename Core::SmemIteratorA;
  using SmemLayoutB = typename Core::SmemLayoutB;
  static constexpr int kElementsPerVector = 128 / cutlass::sizeof_bits<Element>::value;  // 8

  struct SharedStorage {
    cutlass::AlignedBuffer<Element, TileM * kTileK * Stages> a;      // A tiles (CUTLASS layout)
    cutlass::AlignedBuffer<Element, kTileK * TileN> b;               // dequantised B tile
    cutlass::AlignedBuffer<uint8_t, Stages * TileN * kPackedBytes> packed;  // [stage][n][bytes]
    cutlass::AlignedBuffer<Scale, Stages * 2 * TileN> scales;        // [stage][half][n]
    cutlass::AlignedBuffer<Element, Format::kZeros ? Stages * 2 * TileN : 8> zeros;  // likewise

    CUTLASS_DEVICE cutlass::TensorRef<Element, SmemLayoutA> a_ref() {
      return {a.data(), SmemLayoutA::packed({TileM, kTileK * Stages})};
    }
    CUTLASS_DEVICE cutlass::TensorRef<Element, SmemLayoutB> b_ref() {
      return {b.data(), SmemLayoutB::packed({kTileK, TileN})};
    }
  };

  // What one tile reads besides A.
  struct BOperand {
    const uint8_t* packed;  // the problem's packed [N, K] weights
    int64_t row_bytes;      // ldb * bits / 8
    const Scale* scales;    // [K/G, N]
    const Element* zeros;   // int4: [K/G, N] or null; null for the other formats
    int n0;                 // the tile's first column
    int n;                  // N
    int group_size;
  };

  // Stage `slot` <- K-tile `tile` (first K `k_begin`, `k_extent` valid K), or zero fill when the
  // tile does not exist (`active` false; the copies still complete a commit group).
  CUTLASS_DEVICE static void copy_b(SharedStorage& s, BOperand const& b, int slot, int k_begin,
                                    int k_extent, bool active) {
    const int thread = threadIdx.x;
    uint8_t* packed = s.packed.data() + slot * TileN * kPackedBytes;
    constexpr int kColumnChunks = kPackedBytes / 16;
    constexpr int kChunks = TileN * kColumnChunks;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
      const int c = thread + i * kThreads;
      if (kChunks % kThreads == 0 || c < kChunks) {
        const int col = c / kColumnChunks, part = c % kColumnChunks;
        const bool valid = active && b.n0 + col < b.n && part * kChunkK < k_extent;
        const uint8_t* src = valid ? b.packed + int64_t(b.n0 + col) * b.row_bytes +
                                         (k_begin + part * kChunkK) * kBits / 8
                                   : b.packed;
        cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(
            packed + col * kPackedBytes + part * 16, src, valid);
      }
    }
    // One row of scales (and zero points) per 32-long half of the K-tile: its group's row.
    constexpr int kRowChunks = TileN / kScalesPerChunk;
    for (int c = thread; c < 2 * kRowChunks; c += kThreads) {
      const int half = c / kRowChunks;
      const int col = (c % kRowChunks) * kScalesPerChunk;
      const bool valid = active && b.n0 + col < b.n && half * kHalfK < k_extent;
      const int64_t group = valid ? (k_begin + half * kHalfK) / b.group_size : 0;
      cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(
          s.scales.data() + (slot * 2 + half) * TileN + col,
          valid ? b.scales + group * b.n + b.n0 + col : b.scales, valid);
    }
    if constexpr (Format::kZeros) {
      if (b.zeros == nullptr) return;
      constexpr int kZeroChunks = TileN / 8;
      for (int c = thread; c < 2 * kZeroChunks; c += kThreads) {
        const int half = c / kZeroChunks;
        const int col = (c % kZeroChunks) * 8;
        const bool valid = active && b.n0 + col < b.n && half * kHalfK < k_extent;
        const int64_t group = valid ? (k_begin + half * kHalfK) / b.group_size : 0;
        cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(
            s.zeros.data() + (slot * 2 + half) * TileN + col,
            valid ? b.zeros + group * b.n + b.n0 + col : b.zeros, valid);
      }
    }
  }

  // Every tile has one thread per column (kThreads == TileN): thread t dequantises column t of
  // each K-tile (its packed bytes read as 16-byte vectors), with one scale (and zero point) per
  // 32-long half. Its eight 16-byte destinations in the B tile are the same for every K-tile, so
  // their offsets are computed once.
  static_assert(kThreads == TileN, "the dequantisation maps one thread to one column");
  struct BTileOffsets {
    int at[kTileK / 8];
  };

  CUTLASS_DEVICE static BTileOffsets b_tile_offsets() {
    const SmemLayoutB layout = SmemLayoutB::packed({kTileK, TileN});
    BTileOffsets o;
    CUTLASS_PRAGMA_UNROLL
    for (int kv = 0; kv < kTileK / 8; ++kv) {
      o.at[kv] = int(layout(cutlass::MatrixCoord(kv * 8, int(threadIdx.x))));
    }
    return o;
  }

  // Stage `slot`'s packed tile -> the 16-bit B tile, each weight rounded once (Format).
  CUTLASS_DEVICE static void dequantise(SharedStorage& s, int slot, bool has_zeros,
                                        BTileOffsets const& offsets) {
    constexpr int kHalfWords = kPackedBytes / 2 / 4;  // 32-bit words of one K-half
    const int col = threadIdx.x;
    const uint4* packed =
        reinterpret_cast<const uint4*>(s.packed.data() + (slot * TileN + col) * kPackedBytes);
    const Scale* scales = s.scales.data() + slot * 2 * TileN + col;
    const Element* zeros = s.zeros.data() + (Format::kZeros ? slot * 2 * TileN + col : 0);
    Element* b = s.b.data();
    CUTLASS_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      uint32_t words[kHalfWords];
      CUTLASS_PRAGMA_UNROLL
      for (int v = 0; v < kHalfWords / 4; ++v) {
        const uint4 vec = packed[half * (kHalfWords / 4) + v];
        words[4 * v] = vec.x;
        words[4 * v + 1] = vec.y;
        words[4 * v + 2] = vec.z;
        words[4 * v + 3] = vec.w;
      }
      uint4 out[4];
      Format::dequantise(words, scales[half * TileN],
                         has_zeros ? zeros + half * TileN : nullptr, out);
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < 4; ++w) *reinterpret_cast<uint4*>(b + offsets.at[half * 4 + w]) = out[w];
    }
  }

  CUTLASS_DEVICE static void run(SharedStorage& s, IteratorA& iterator_a, BOperand const& b,
                                 int k_total, int k_iterations, FragmentC& accumulators) {
    const int thread = threadIdx.x;
    const int warp = cutlass::canonical_warp_idx_sync();
    const int lane = threadIdx.x % 32;
    const int warp_m = warp % WarpCount::kM;
    const int warp_n = warp / WarpCount::kM;
    // CUTLASS's predicated iterator takes the K residue first.
    const int residue = k_total - (k_iterations - 1) * kTileK;
    auto k_begin = [&](int tile) { return tile == 0 ? 0 : residue + (tile - 1) * kTileK; };
    auto k_extent = [&](int tile) { return tile == 0 ? residue : kTileK; };
    const bool has_zeros = Format::kZeros && b.zeros != nullptr;
    const BTileOffsets b_offsets = b_tile_offsets();

    SmemIteratorA smem_a(s.a_ref(), thread);
    int write_slot = 0;
    auto copy_stage = [&](int tile) {
      const bool active = tile < k_iterations;
      iterator_a.clear_mask(!active);
      iterator_a.set_iteration_index(0);
      smem_a.set_iteration_index(0);
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < ThreadMapA::Iterations::kCount; ++j) {
        auto* dst = reinterpret_cast<typename IteratorA::AccessType*>(smem_a.get());
        constexpr int kSrcBytes = cutlass::sizeof_bits<Element>::value *
                                  ThreadMapA::kElementsPerAccess /
                                  IteratorA::kAccessesPerVector / 8;
        CUTLASS_PRAGMA_UNROLL
        for (int v = 0; v < IteratorA::kAccessesPerVector; ++v) {
          cutlass::arch::cp_async_zfill<kSrcBytes, cutlass::arch::CacheOperation::Global>(
              dst + v, iterator_a.get(), iterator_a.valid());
          ++iterator_a;
        }
        ++smem_a;
      }
      copy_b(s, b, write_slot, active ? k_begin(tile) : 0, active ? k_extent(tile) : 0, active);
      cutlass::arch::cp_async_fence();
      iterator_a.add_tile_offset({0, 1});
      smem_a.add_tile_offset({0, 1});
      if (++write_slot == Stages) {
        smem_a.add_tile_offset({0, -Stages});
        write_slot = 0;
      }
    };

    CUTLASS_PRAGMA_UNROLL
    for (int stage = 0; stage < Stages - 1; ++stage) copy_stage(stage);

    Operator warp_mma;
    for (int tile = 0; tile < k_iterations; ++tile) {
      const int read_slot = tile % Stages;
      cutlass::arch::cp_async_wait<Stages - 2>();
      __syncthreads();  // stage `tile` landed; every warp is done with the previous B tile
      dequantise(s, read_slot, has_zeros, b_offsets);
      copy_stage(tile + Stages - 1);  // into the slot the previous iteration read
      __syncthreads();  // the B tile is complete

      typename Operator::IteratorA warp_a(s.a_ref(), lane);
      typename Operator::IteratorB warp_b(s.b_ref(), lane);
      warp_a.add_tile_offset({warp_m, read_slot * kWarpGemmIterations});
      warp_b.add_tile_offset({0, warp_n});
      CUTLASS_PRAGMA_UNROLL
      for (int kk = 0; kk < kWarpGemmIterations; ++kk) {
        typename Operator::FragmentA frag_a;
        typename Operator::FragmentB frag_b;
        warp_a.set_kgroup_index(kk);
        warp_b.set_kgroup_index(kk);
        warp_a.load(frag_a);
        warp_b.load(frag_b);
        ++warp_a;
        ++warp_b;
        typename Operator::TransformedFragmentA tfrag_a;
        typename Operator::TransformedFragmentB tfrag_b;
        warp_mma.transform(tfrag_a, tfrag_b, frag_a, frag_b);
        warp_mma(accumulators, tfrag_a, tfrag_b, accumulators);
      }
    }
    // The epilogue reuses this shared memory: no copy may still be in flight.
    cutlass::arch::cp_async_wait<0>();
    __syncthreads();
  }
};

// Kernel level: the project's tile loop over every problem's tiles, the group-scaled mainloop, and
// CUTLASS's tensor-op epilogue (D = accumulator, rounded to the output dtype).
template <typename Mainloop, typename Epilogue>
struct Sm80GroupedGemmGroupScaledKernel {
  using Element = typename Mainloop::IteratorA::Element;
  using ElementD = typename Epilogue::OutputTileIterator::Element;
  using LayoutD = typename Epilogue::OutputTileIterator::Layout;
  using OutputOp = typename Epilogue::OutputOp;
  using ThreadblockShape = typename Mainloop::Shape;
  static constexpr int kThreadCount = Mainloop::kThreads;

  using ProblemVisitor = cutlass::gemm::kernel::GemmGroupedProblemVisitor<
      ThreadblockShape, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly, kThreadCount,
      kThreadCount, /*Transposed=*/false>;

  struct Params
      : GroupScaledGemmParams<Element, typename Mainloop::Scale, typename OutputOp::Params> {
    typename ProblemVisitor::Params problem_visitor{};
  };

  struct SharedStorage {
    union {
      typename Mainloop::SharedStorage main_loop;
      typename Epilogue::SharedStorage epilogue;
    } kernel;
    // Not overlapped: the visitor's state lives across tiles.
    typename ProblemVisitor::SharedStorage problem_visitor;
  };

  CUTLASS_DEVICE
  Sm80GroupedGemmGroupScaledKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    for_each_tile<ProblemVisitor, ThreadblockShape, Element>(
        params.problem_visitor, shared_storage.problem_visitor, [&](GroupedTile const& tile) {
          const int p = tile.problem_idx;
          const int thread_idx = threadIdx.x;
          typename Mainloop::IteratorA iterator_a(
              typename Mainloop::LayoutA(params.lda[p]), params.ptr_A[p],
              {tile.problem_size.m(), tile.problem_size.k()}, thread_idx,
              cutlass::MatrixCoord(tile.offset.row(), 0));
          typename Mainloop::BOperand b;
          b.packed = params.ptr_B[p];
          b.row_bytes = params.ldb[p] * Mainloop::kBits / 8;
          b.scales = params.ptr_scale[p];
          b.zeros = Mainloop::Format::kZeros && params.ptr_zero != nullptr ? params.ptr_zero[p]
                                                                           : nullptr;
          b.n0 = tile.offset.column();
          b.n = tile.problem_size.n();
          b.group_size = params.group_size;
          typename Mainloop::FragmentC accumulators;
          accumulators.clear();
          Mainloop::run(shared_storage.kernel.main_loop, iterator_a, b, tile.problem_size.k(),
                        tile.k_iterations, accumulators);

          OutputOp output_op(params.output_op);
          typename Epilogue::OutputTileIterator::Params params_d(LayoutD(params.ldd[p]));
          typename Epilogue::OutputTileIterator iterator_d(params_d, params.ptr_D[p],
                                                           tile.problem_size.mn(), thread_idx,
                                                           tile.offset);
          Epilogue epilogue(shared_storage.kernel.epilogue, thread_idx,
                            cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
          // beta = 0: the source is not read; D stands in for it.
          epilogue(output_op, iterator_d, accumulators, iterator_d);
        });
  }
};

// The tactic's host side: the interface every grouped-GEMM tactic has (see tactic.h).
template <typename Element, template <typename> class FormatOf, int TileM, int TileN, int TileK,
          int WarpM, int WarpN, int WarpK, int Stages>
struct Sm80GroupedGemmGroupScaled {
  static_assert(TileK == 64 && WarpK == 64, "the group-scaled mainloop walks K in tiles of 64");
  using Format = FormatOf<Element>;
  using Mainloop = GroupScaledMainloop<Element, Format, TileM, TileN, WarpM, WarpN, Stages>;
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<Element>::value;
  using OutputOp = cutlass::epilogue::thread::LinearCombination<Element, kAlignmentD, float, float>;
  using Epilogue = typename cutlass::epilogue::threadblock::DefaultEpilogueTensorOp<
      typename Mainloop::Shape, typename Mainloop::Operator, 1, OutputOp, kAlignmentD>::Epilogue;
  using GemmKernel = Sm80GroupedGemmGroupScaledKernel<Mainloop, Epilogue>;

  static constexpr int kThreads = GemmKernel::kThreadCount;
  static constexpr int kSmemBytes = int(sizeof(typename GemmKernel::SharedStorage));

  static int prepare() { return prepare_kernel<GemmKernel>(kThreads, kSmemBytes); }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    if (a.ptr_scale == nullptr) {
      throw InvalidArgument("group-scaled grouped GEMM needs per-expert scale pointers");
    }
    if (a.group_size <= 0 || a.group_size % 32 != 0) {
      throw InvalidArgument("group-scaled grouped GEMM: the group size must be a positive "
                            "multiple of 32 (got " + std::to_string(a.group_size) + ")");
    }
    // Params built per call (no state kept between calls): thread-safe and graph-capturable.
    typename GemmKernel::Params params;
    params.problem_visitor = typename GemmKernel::ProblemVisitor::Params(
        static_cast<const cutlass::gemm::GemmCoord*>(a.problem_sizes), a.problem_count);
    params.output_op = typename OutputOp::Params(1.0f, 0.0f);
    params.ptr_A = reinterpret_cast<Element**>(a.ptr_a);
    params.ptr_B = reinterpret_cast<uint8_t**>(a.ptr_b);
    params.ptr_D = reinterpret_cast<Element**>(a.ptr_d);
    params.ptr_scale = reinterpret_cast<typename Mainloop::Scale**>(a.ptr_scale);
    params.ptr_zero = reinterpret_cast<Element**>(a.ptr_zero);
    params.lda = a.lda;
    params.ldb = a.ldb;
    params.ldd = a.ldd;
    params.group_size = a.group_size;
    launch_grouped_kernel<GemmKernel>(params, threadblock_count, kThreads, kSmemBytes, stream,
                                      a.pdl);
  }
};

// The three formats' tactics (tools/generate_kernels.py names them by these).
template <typename Element, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages>
using Sm80GroupedGemmInt4 = Sm80GroupedGemmGroupScaled<Element, weight_format::Int4, TileM, TileN,
                                                       TileK, WarpM, WarpN, WarpK, Stages>;
template <typename Element, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages>
using Sm80GroupedGemmFp8 = Sm80GroupedGemmGroupScaled<Element, weight_format::Fp8E4m3, TileM,
                                                      TileN, TileK, WarpM, WarpN, WarpK, Stages>;
template <typename Element, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages>
using Sm80GroupedGemmMxfp4 = Sm80GroupedGemmGroupScaled<Element, weight_format::Mxfp4, TileM,
                                                        TileN, TileK, WarpM, WarpN, WarpK, Stages>;

}  // namespace grouped_gemm
}  // namespace cutlass_moe
