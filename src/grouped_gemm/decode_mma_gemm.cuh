// Tensor-core decode tactics for int4 weights ("sm80_decode_mma"): grouped GEMMs for calls with
// few rows per expert whose packed int4 weights are converted to 16 bits in registers and fed
// to mma.sync, so that a weight costs about two ALU operations instead of the FMA decode
// kernel's four (docs/architecture.md, "Tensor-core decode for int4 weights").
//
// The product is computed transposed: D^T[cols, rows] = W[cols, K] x A^T[K, rows], one
// m16n8k16 MMA per 16 weight rows (output columns), 8 activation rows (tokens) and 16 K.
// - Weights in the common layout (uint8 [N, K/2], low nibble = even k): lane l reads 16 bytes
//   (32 consecutive k) of weight rows l/4 and l/4 + 8 of its tile, at k = chunk * 128 +
//   (l % 4) * 32. The K order inside an MMA is free as long as the weights (A) and the
//   activations (B) use the same one: a lane's MMA k-slots {2t, 2t+1, 2t+8, 2t+9} (t = l % 4)
//   are mapped to pairs of its own 32 k, so both operands stay in the lane that loaded them.
//   Pair m (0..15) of a lane's 16 bytes is nibbles p and p + 4 of word m / 4 (p = m % 4, i.e.
//   k = 8 (m / 4) + p and + 4): one mask-and-or places them in the low mantissa bits of a
//   16-bit pair of 2^7 (bf16) or 2^10 (fp16), and a packed subtraction gives q exactly. MMA step
//   j takes pairs 2j (k-slots 2t, 2t+1) and 2j + 1 (2t + 8, 2t + 9); the activations of
//   the same k are paired with one byte permute.
// - Scales (and zero points) per (K-group, column) are applied before the MMA as the int4
//   mainloop does: q - z exactly (a packed subtraction of 2^7 or 2^10 + z; z = 8 without zero
//   points), then one rounding of (q - z) * s; zero points that are no small integers take the
//   fp32 formula instead (for the warp's whole batch). A lane's 32 k never straddle a group
//   (groups are multiples of 32). Without zero points and with groups of whole 128-long chunks (G = 128,
//   256, ..., per-channel K), the MMA takes q - 8 exactly and each chunk's fp32 sums are
//   multiplied by their row's scale instead (one packed operation less per weight pair, and no
//   rounding of the weights at all).
// - Gated (GEMM1 of a gated activation): the 16 rows of an MMA are 8 up rows (n) and their 8
//   gate rows (I + n), so each lane ends with both halves of its output columns and applies
//   the activation itself.
// - Work items are (chunk of up to kRows = 8 kGroups rows of one expert, tile of kTiles MMA row
//   tiles); the block's warps split the item's K in 128-long chunks (interleaved) and their
//   sums are added in shared memory in warp order (deterministic). Each warp works in batches
//   of kUnroll chunks: it issues a batch's weight and scale loads, then reads the activations
//   (cache hits mostly) as it multiplies; kPrefetch variants issue the next batch's weight loads
//   before multiplying the current one. Measured on an H200, reading the activations only then
//   puts two latencies in each batch and is 2-3x slower than loading them with the weights
//   (docs/architecture.md): these tactics are tuner candidates, not defaults.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "grouped_gemm/decode_gemm.cuh"

namespace cutlass_moe {
namespace grouped_gemm {
namespace decode {

// Packed 16-bit arithmetic and the MMA for the activation dtype (bf16 or fp16).
template <typename Element>
struct Packed16 {
  static constexpr bool kBf16 = std::is_same<Element, cutlass::bfloat16_t>::value;
  static_assert(kBf16 || std::is_same<Element, cutlass::half_t>::value, "bf16 or fp16 only");
  // (2^7, 2^7) bf16 or (2^10, 2^10) fp16: q in the low mantissa bits reads as the magic + q.
  static constexpr uint32_t kMagic = kBf16 ? 0x43004300u : 0x64006400u;
  static constexpr float kMagicValue = kBf16 ? 128.0f : 1024.0f;
  static constexpr uint32_t kMinusMagicPlus8 = kBf16 ? 0xC308C308u : 0xE408E408u;  // -(magic+8)
  static __device__ __forceinline__ uint32_t one() { return kBf16 ? 0x3F803F80u : 0x3C003C00u; }

  static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    if constexpr (kBf16) {
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    } else {
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    }
    return d;
  }

  // x twice, rounded once.
  static __device__ __forceinline__ uint32_t splat(float x) {
    const uint32_t bits = kBf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x))
                                : __half_as_ushort(__float2half_rn(x));
    return bits | (bits << 16);
  }

  // (lo * s, hi * s), each rounded once.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi, float s) {
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo * s, hi * s);
      return *reinterpret_cast<const uint32_t*>(&v);
    } else {
      const __half2 v = __floats2half2_rn(lo * s, hi * s);
      return *reinterpret_cast<const uint32_t*>(&v);
    }
  }

  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kBf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
};

// Element: activation dtype; int4 weights. kGroups groups of 8 rows per item, kTiles MMA row
// tiles (16 weight rows each) per item, kWarps warps splitting K, kUnroll chunks of loads in
// flight per warp, kPrefetch: one batch of loads ahead.
template <typename Element, int kGroups, int kTiles, int kWarps, int kUnroll, bool kGated,
          bool kPrefetch>
struct MmaKernel {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 8 * kGroups;
  static constexpr int kColsPerTile = kGated ? 8 : 16;  // output columns per MMA row tile
  static constexpr int kCols = kColsPerTile * kTiles;
  static constexpr int kChunk = 128;  // K per warp step: 4 lanes x 32
  static constexpr bool kInt8 = false;
  static constexpr bool kGroupScaled = true;
  static constexpr bool kGatedKernel = kGated;
  using Math = Packed16<Element>;
  using Chunks = RowChunks<kRows, kThreads>;

  struct SharedStorage {
    typename Chunks::Storage chunks;
    float partial[kWarps][kTiles * kGroups * 4][32];  // each warp's sums, summed by warp 0
  };

  static __device__ void run(const Params& p, SharedStorage& shared) {
    const int total_chunks = Chunks::scan(p, shared.chunks);
    if (total_chunks == 0) return;
    const int64_t n_total = p.problem_sizes[0].n();  // every problem of a GEMM shares N and K
    const int64_t k_total = p.problem_sizes[0].k();
    const int col_tiles = static_cast<int>((n_total + kCols - 1) / kCols);
    const int64_t items = static_cast<int64_t>(total_chunks) * col_tiles;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;

    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const int chunk = static_cast<int>(item / col_tiles);
      const int col_tile = static_cast<int>(item % col_tiles);
      int e, first, rows;
      Chunks::locate(p, shared.chunks, chunk, e, first, rows);
      float acc[kTiles][kGroups][4];
      compute(p, e, first, rows, int64_t(col_tile) * kCols, n_total, k_total, warp, lane, acc);
      // K split over the warps: warp 0 adds the others' sums in warp order, then stores.
      if (warp != 0) {
#pragma unroll
        for (int t = 0; t < kTiles; ++t)
#pragma unroll
          for (int g = 0; g < kGroups; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i) shared.partial[warp][(t * kGroups + g) * 4 + i][lane] =
                acc[t][g][i];
      }
      __syncthreads();
      if (warp == 0) {
#pragma unroll
        for (int w = 1; w < kWarps; ++w)
#pragma unroll
          for (int t = 0; t < kTiles; ++t)
#pragma unroll
            for (int g = 0; g < kGroups; ++g)
#pragma unroll
              for (int i = 0; i < 4; ++i)
                acc[t][g][i] += shared.partial[w][(t * kGroups + g) * 4 + i][lane];
        store(p, e, first, rows, int64_t(col_tile) * kCols, n_total, lane, acc);
      }
      __syncthreads();  // the partial sums are reused by the next item
    }
  }

  // Weight row of MMA row r (0..15) of tile t: plain, rows col0 + 16 t + r; gated, 8 up rows
  // col0 + 8 t + r and their gate rows n_total + col0 + 8 t + r - 8. Past N: the last row again
  // (computed, never stored).
  static __device__ __forceinline__ int64_t weight_row(int64_t col0, int t, int r,
                                                       int64_t n_total) {
    int64_t n = col0 + t * kColsPerTile + (kGated ? r % 8 : r);
    n = n < n_total ? n : n_total - 1;
    return kGated && r >= 8 ? n + n_total : n;
  }

  static __device__ __forceinline__ void compute(const Params& p, int e, int first, int rows,
                                                 int64_t col0, int64_t n_total, int64_t k_total,
                                                 int warp, int lane,
                                                 float (&acc)[kTiles][kGroups][4]) {
    const int quad = lane % 4;  // the lane's 32-long K slice of each chunk
    const int group_row = lane / 4;
    // Activation row of the lane's token in each group (B column lane / 4); none past `rows`.
    const Element* a_base = static_cast<const Element*>(p.ptr_a[e]);
    const Element* a_rows[kGroups];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int row = g * 8 + group_row;
      if (row < rows) {
        const int64_t source =
            kGated ? static_cast<int64_t>(p.ptr_rows[e][first + row]) : first + row;
        a_rows[g] = a_base + source * p.lda[e];
      } else {
        a_rows[g] = nullptr;
      }
    }
    const uint8_t* b = static_cast<const uint8_t*>(p.ptr_b[e]);
    const int64_t ldb_bytes = p.ldb[e] / 2;
    int64_t w_row[kTiles][2];  // weight rows lane / 4 and lane / 4 + 8 of each tile
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) w_row[t][h] = weight_row(col0, t, group_row + 8 * h, n_total);
    const Element* scales = static_cast<const Element*>(p.ptr_scale[e]);
    const Element* zeros =
        p.ptr_zero != nullptr ? static_cast<const Element*>(p.ptr_zero[e]) : nullptr;
    const int64_t scale_ld = kGated ? 2 * n_total : n_total;

#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][g][i] = 0.0f;

    // Batches of kUnroll chunks per warp (the warps' chunks interleaved); with kPrefetch the
    // weight loads of the next batch are issued before the current one is converted and
    // multiplied (twice the registers: fewer blocks per SM).
    const int64_t chunks = (k_total + kChunk - 1) / kChunk;
    const int64_t stride = int64_t(kWarps) * kUnroll;
    Operands cur, next;
    // Without zero points and with groups of whole chunks, a chunk's 16-bit weights are q - 8
    // (exact) and its scale multiplies the chunk's fp32 sums per weight row.
    const bool post_scale = zeros == nullptr && p.group_size % kChunk == 0;
    Source src{b, ldb_bytes, scales, zeros, scale_ld, p.group_size, k_total, quad, post_scale};
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      src.w_row[t][0] = w_row[t][0];
      src.w_row[t][1] = w_row[t][1];
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) src.a_rows[g] = a_rows[g];
    if constexpr (kPrefetch) {
      load(src, warp, cur);
      for (int64_t c0 = warp; c0 < chunks; c0 += stride) {
        load(src, c0 + stride, next);  // past K: zeros, nothing read
        multiply(src, c0, cur, acc);
        cur = next;
      }
    } else {
      for (int64_t c0 = warp; c0 < chunks; c0 += stride) {
        load(src, c0, cur);
        multiply(src, c0, cur, acc);
      }
    }
  }

  // What a warp reads for its chunks: weight rows, scales, zero points and activation rows.
  struct Source {
    const uint8_t* b;
    int64_t ldb_bytes;
    const Element* scales;
    const Element* zeros;
    int64_t scale_ld;
    int group_size;
    int64_t k_total;
    int quad;
    bool post_scale;
    int64_t w_row[kTiles][2];
    const Element* a_rows[kGroups];
  };

  // The weights of one batch of kUnroll chunks in registers: packed codes, and (s, s) and
  // (-z s, -z s) per weight row (post_scale: s as fp32 bits). The activations (a few KB that
  // every block re-reads, so mostly cache hits) are read when the batch is multiplied.
  struct Operands {
    uint4 w[kUnroll][kTiles][2];
    uint32_t scale2[kUnroll][kTiles][2];
    uint32_t shift2[kUnroll][kTiles][2];
    bool exact_fp32;  // a zero point of the batch is no small integer: fp32 conversion, warp-wide
  };

  static __device__ __forceinline__ int64_t slice(const Source& src, int64_t c0, int u) {
    return (c0 + int64_t(u) * kWarps) * kChunk + src.quad * 32;
  }

  static __device__ __forceinline__ void load(const Source& src, int64_t c0, Operands& o) {
    o.exact_fp32 = false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = slice(src, c0, u);
      const bool in_k = k < src.k_total;  // K is a multiple of 32: a slice is all in or all out
      const int64_t group = in_k ? k / src.group_size : 0;
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          o.w[u][t][h] = in_k ? load_streaming(src.b + src.w_row[t][h] * src.ldb_bytes + k / 2)
                              : make_uint4(0, 0, 0, 0);
          const int64_t at = group * src.scale_ld + src.w_row[t][h];
          const float s = in_k ? to_float(src.scales[at]) : 0.0f;
          const float z = src.zeros != nullptr ? to_float(src.zeros[at]) : 8.0f;
          o.scale2[u][t][h] = __float_as_uint(s);
          o.shift2[u][t][h] = __float_as_uint(z);
        }
    }
    if (src.post_scale) return;  // scale2: s as fp32 bits
    // Packed: (s, s) and -(2^7 or 2^10 + z) twice, so that q - z is exact and the product is
    // rounded once (as the reference). Zero points that are no small integers (rare) take the
    // fp32 formula for the whole batch of the warp (fp32 bits kept).
    bool odd = false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float z = __uint_as_float(o.shift2[u][t][h]);
          odd |= !(z == rintf(z) && fabsf(z) <= 64.0f);
        }
    o.exact_fp32 = __any_sync(0xffffffffu, odd);
    if (o.exact_fp32) return;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          o.scale2[u][t][h] = Math::splat(__uint_as_float(o.scale2[u][t][h]));
          o.shift2[u][t][h] = Math::splat(-(Math::kMagicValue + __uint_as_float(o.shift2[u][t][h])));
        }
  }

  static __device__ __forceinline__ void multiply(const Source& src, int64_t c0,
                                                  const Operands& o,
                                                  float (&acc)[kTiles][kGroups][4]) {
    float partial[kTiles][kGroups][4];  // post_scale: one chunk's sums
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[t][g][i] = 0.0f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = slice(src, c0, u);
      uint4 act[kGroups][4];
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int v = 0; v < 4; ++v)
          act[g][v] = k < src.k_total && src.a_rows[g] != nullptr
                          ? load_cached(src.a_rows[g] + k + 8 * v)
                          : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // MMA steps: pairs 2j and 2j + 1
        uint32_t bfrag[kGroups][2];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const uint32_t* x = reinterpret_cast<const uint32_t*>(act[g]);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int m = 2 * j + half;
            const int word = 4 * (m / 4) + (m % 4) / 2;  // elements k and k + 4 of pair m
            bfrag[g][half] = __byte_perm(x[word], x[word + 2], (m % 2) ? 0x7632 : 0x5410);
          }
        }
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          uint32_t afrag[4];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int m = 2 * j + half;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t word = reinterpret_cast<const uint32_t*>(&o.w[u][t][h])[m / 4];
              const uint32_t biased = ((word >> (4 * (m % 4))) & 0x000F000Fu) | Math::kMagic;
              if (src.post_scale) {
                afrag[2 * half + h] = Math::fma(biased, Math::one(), Math::kMinusMagicPlus8);
              } else if (!o.exact_fp32) {
                const uint32_t q = Math::fma(biased, Math::one(), o.shift2[u][t][h]);  // q - z
                afrag[2 * half + h] = Math::fma(q, o.scale2[u][t][h], 0u);
              } else {
                const float s = __uint_as_float(o.scale2[u][t][h]);
                const float z = __uint_as_float(o.shift2[u][t][h]);
                const uint32_t codes = (word >> (4 * (m % 4))) & 0x000F000Fu;
                afrag[2 * half + h] = Math::pack(float(codes & 0xFu) - z, float(codes >> 16) - z,
                                                 s);
              }
            }
          }
#pragma unroll
          for (int g = 0; g < kGroups; ++g) {
            Math::mma(src.post_scale ? partial[t][g] : acc[t][g], afrag, bfrag[g][0],
                      bfrag[g][1]);
          }
        }
      }
      if (src.post_scale) {  // the chunk's sums times its scale per weight row (lo, hi)
#pragma unroll
        for (int t = 0; t < kTiles; ++t)
#pragma unroll
          for (int g = 0; g < kGroups; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[t][g][i] = fmaf(__uint_as_float(o.scale2[u][t][i / 2]), partial[t][g][i],
                                  acc[t][g][i]);
              partial[t][g][i] = 0.0f;
            }
      }
    }
  }

  // Lane l holds, per tile and group, columns l / 4 (c0, c1) and l / 4 + 8 (c2, c3) of rows
  // 2 (l % 4) and 2 (l % 4) + 1 of the group; gated: up (c0, c1) and gate (c2, c3) of column
  // l / 4.
  static __device__ __forceinline__ void store(const Params& p, int e, int first, int rows,
                                               int64_t col0, int64_t n_total, int lane,
                                               const float (&acc)[kTiles][kGroups][4]) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = g * 8 + 2 * (lane % 4) + r;
          if (row >= rows) continue;
          const int64_t n = col0 + t * kColsPerTile + lane / 4;
          if constexpr (kGated) {
            if (n < n_total) {
              store_output<Element, true>(p, e, first + row, n, n_total, acc[t][g][r],
                                          acc[t][g][2 + r]);
            }
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (n + 8 * h < n_total) {
                const float v = acc[t][g][2 * h + r];
                store_output<Element, false>(p, e, first + row, n + 8 * h, n_total, v, v);
              }
            }
          }
        }
  }
};

// The tensor-core int4 decode tactic.
template <typename Element, int kGroups, int kTiles, int kWarps, int kUnroll, bool kGated,
          bool kPrefetch>
struct DecodeMmaGemm
    : DecodeLauncher<MmaKernel<Element, kGroups, kTiles, kWarps, kUnroll, kGated, kPrefetch>> {};

}  // namespace decode
}  // namespace grouped_gemm
}  // namespace cutlass_moe
