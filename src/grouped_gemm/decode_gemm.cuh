// Weight-streaming decode tactics ("sm80_decode"): grouped GEMMs for calls with few rows per
// expert, where a GEMM is bound by reading the touched experts' weights once.
//
// They read the same device-resident arguments as the CUTLASS tactics (GroupedGemmArgs: problem
// sizes, A/B/D pointers and leading dimensions per expert, per-column scales for int8 weights,
// and, for the gated variant, token row indices, the fc1 bias and the gated activation), so the
// runner launches them like any other tactic. What differs is the schedule:
//
// - A work item is (a chunk of up to kRows rows of one expert, a tile of kCols output columns).
//   Every block first scans the problem sizes into a prefix of row chunks (in shared memory), so
//   the persistent grid's blocks walk only the items that exist: no block visits an empty expert.
// - Each warp owns kColsPerWarp output columns of the item (both the up and the gate weight row
//   of each in the gated variant). Its lanes split K in 16-byte weight vectors; every lane
//   issues kUnroll x (weight rows) 16-byte loads before it uses any of them, with a streaming
//   cache hint, so each warp keeps several KB of weights in flight: a wave of such warps is what
//   saturates HBM when a decode GEMM has few output tiles for a tensor-core kernel.
// - The activation rows (at most kRows) are read through the read-only cache: every warp of
//   every block that works on this chunk reads the same few KB.
// - Products are summed in fp32 per lane, then across the warp by a fixed butterfly: results do
//   not depend on timing (deterministic).
// - Group-scaled weights (int4, fp8, mxfp4): a 16-byte vector holds 32 or 16 weights of one
//   K-group (groups are multiples of 32 long), so each lane reads one scale (int4: and zero
//   point) per vector and column, converts the weights to exact fp32 (int4: q - zero) and
//   applies the scale once to the vector's partial sums.
// - Epilogue: int8 weights' per-column scale, rounding to the activation dtype where the unfused
//   path rounds (GEMM1's output; then bias and activation in fp32, as the activation kernel).
//
// No tensor cores: with at most kRows rows, a 16-byte weight vector feeds 8 or 16 x kRows FMAs,
// which the SM's fp32 units sustain at memory speed for the row counts these tactics serve.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include <cub/block/block_scan.cuh>

#include "activation_math.cuh"
#include "cutlass/float8.h"
#include "cutlass/float_subbyte.h"
#include "cutlass/gemm_coord.h"
#include "cutlass/numeric_types.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/problem.h"
#include "cutlass_moe/tactic.h"
#include "grouped_gemm/weight_codes.cuh"
#include "launch.cuh"

namespace cutlass_moe {
namespace grouped_gemm {
namespace decode {

// Local experts a decode kernel can scan (as many as routing accepts).
constexpr int kMaxExperts = 3072;

// 16-byte vectors of weights or activations, converted to fp32.
__device__ __forceinline__ void to_float(const uint4& v, cutlass::bfloat16_t, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void to_float(const uint4& v, cutlass::half_t, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

// Weights k = 8 part .. 8 part + 7 of a 16-byte weight vector, to fp32. `bias` (int4 only) is
// 2^23 + the vector's zero point rounded to an integer (the fraction is applied by the caller).
template <typename Element>
__device__ __forceinline__ void weights8(const uint4& v, int, Element, float, float* out) {
  to_float(v, Element(), out);  // 16-bit weights: the vector is one part
}

// int8 without the (quarter-rate) integer conversion: byte b ^ 0x80 placed in the low mantissa
// bits of 2^23 gives 2^23 + b + 128 exactly, one byte permute and one add per value.
__device__ __forceinline__ void weights8(const uint4& v, int part, int8_t, float, float* out) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(&v) + 2 * part;
  constexpr float kBias = 8388608.0f + 128.0f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t word = words[i] ^ 0x80808080u;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      out[4 * i + b] = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440 + b)) - kBias;
    }
  }
}

// int4: nibble q placed in the low mantissa bits of 2^23 is 2^23 + q exactly, so subtracting
// 2^23 + zero gives q - zero exactly.
__device__ __forceinline__ void weights8(const uint4& v, int part, cutlass::uint4b_t, float bias,
                                         float* out) {
  const uint32_t word = reinterpret_cast<const uint32_t*>(&v)[part];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    out[i] = __uint_as_float(0x4B000000u | ((word >> (4 * i)) & 0xFu)) - bias;
  }
}

__device__ __forceinline__ void weights8(const uint4& v, int part, cutlass::float_e4m3_t, float,
                                         float* out) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(&v) + 2 * part;
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = e4m3_value(words[i / 4] >> (8 * (i % 4)));
}

__device__ __forceinline__ void weights8(const uint4& v, int part, cutlass::float_e2m1_t, float,
                                         float* out) {
  const uint32_t word = reinterpret_cast<const uint32_t*>(&v)[part];
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = e2m1_value(word >> (4 * i));
}

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename Element>
__device__ __forceinline__ float to_float(Element x) {
  return static_cast<float>(x);
}

// Rounds to the activation dtype and back: the value the tensor-core path would have stored.
template <typename Element>
__device__ __forceinline__ float rounded(float x) {
  return static_cast<float>(Element(x));
}

struct Params {
  const cutlass::gemm::GemmCoord* problem_sizes;
  int problem_count;
  void* const* ptr_a;
  void* const* ptr_b;
  void* const* ptr_d;
  const int64_t* lda;
  const int64_t* ldb;
  const int64_t* ldd;
  void* const* ptr_scale;        // int8: per-column scales [N]; int4: group scales [K/G, N']
  void* const* ptr_zero;         // int4: zero points like the scales, or null (zero = 8)
  int group_size;                // int4: K elements per scale group
  int32_t* const* ptr_rows;      // gated: token rows of each problem
  GatedEpilogueArgs gated;       // gated: activation, fc1 bias [E, 2I], clamp parameters
};

// The work items of a decode kernel: chunks of up to kRows rows of one expert. Every block scans
// the problem sizes into a prefix of row chunks (in shared memory) so that a persistent grid
// walks only the items that exist; locate() maps a chunk back to its expert and first row.
template <int kRows, int kThreads>
struct RowChunks {
  using BlockScan = cub::BlockScan<int, kThreads>;
  struct Storage {
    typename BlockScan::TempStorage scan;
    int chunk_prefix[kMaxExperts + 1];  // row chunks of the experts before e
  };

  // Fills the prefix; returns the total number of chunks (the same in every thread).
  static __device__ int scan(const Params& p, Storage& shared) {
    const int num_experts = p.problem_count;
    int running = 0;
    for (int base = 0; base < num_experts; base += kThreads) {
      const int e = base + static_cast<int>(threadIdx.x);
      const int rows = e < num_experts ? p.problem_sizes[e].m() : 0;
      int before = 0, total = 0;
      BlockScan(shared.scan).ExclusiveSum((rows + kRows - 1) / kRows, before, total);
      if (e < num_experts) shared.chunk_prefix[e] = running + before;
      running += total;
      __syncthreads();  // the scan's storage is reused by the next pass
    }
    if (threadIdx.x == 0) shared.chunk_prefix[num_experts] = running;
    __syncthreads();
    return shared.chunk_prefix[num_experts];
  }

  // The expert of `chunk`: the last e with chunk_prefix[e] <= chunk (empty experts share their
  // successor's prefix and are skipped by taking the last); `first` is its first row.
  static __device__ void locate(const Params& p, const Storage& shared, int chunk, int& e,
                                int& first, int& rows) {
    int lo = 0, hi = p.problem_count;  // invariant: prefix[lo] <= chunk < prefix[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (shared.chunk_prefix[mid] <= chunk) lo = mid; else hi = mid;
    }
    e = lo;
    first = (chunk - shared.chunk_prefix[e]) * kRows;
    rows = min(kRows, p.problem_sizes[e].m() - first);
  }
};

// Stores output element (row, n) of problem e from its fp32 sums (gated: the up and gate sums of
// column n), rounded to the activation dtype where the unfused path rounds (GEMM1's output; then
// bias and activation in fp32, as the activation kernel).
template <typename Element, bool kGated>
__device__ __forceinline__ void store_output(const Params& p, int e, int64_t row, int64_t n,
                                             int64_t n_total, float up, float gate) {
  float value = rounded<Element>(up);
  if constexpr (kGated) {
    float u = value, g = rounded<Element>(gate);
    const Element* bias = static_cast<const Element*>(p.gated.bias);
    if (bias != nullptr) {
      u += to_float(bias[e * 2 * n_total + n]);
      g += to_float(bias[e * 2 * n_total + n_total + n]);
    }
    value = activation_math::gated(p.gated.activation, g, u,
                                   activation_math::gated_params(p.gated, e));
  }
  Element* d = static_cast<Element*>(p.ptr_d[e]);
  d[row * p.ldd[e] + n] = Element(value);
}

// Element: activation dtype; Weight: Element, int8_t or cutlass::uint4b_t (with group-wise scales
// whose rows hold N' = kHalves * N columns). kRows rows per work item, kColsPerWarp
// output columns per warp, kWarps warps, kUnroll K-steps of loads issued together. Gated: the
// problem's N is I; output column n multiplies weight rows n (up) and I + n (gate).
template <typename Element, typename Weight, int kRows, int kColsPerWarp, int kWarps,
          int kUnroll, bool kGated>
struct Kernel {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kCols = kColsPerWarp * kWarps;
  static constexpr int kHalves = kGated ? 2 : 1;  // weight rows per output column
  static constexpr int kWeightBits = cutlass::sizeof_bits<Weight>::value;
  static constexpr int kVec = 128 / kWeightBits;  // weights per 16-byte vector
  static constexpr int kStep = 32 * kVec;         // K per warp-wide step
  static constexpr bool kInt8 = std::is_same<Weight, int8_t>::value;
  static constexpr bool kInt4 = std::is_same<Weight, cutlass::uint4b_t>::value;
  static constexpr bool kFp8 = std::is_same<Weight, cutlass::float_e4m3_t>::value;
  static constexpr bool kMxfp4 = std::is_same<Weight, cutlass::float_e2m1_t>::value;
  // Scales per (K-group, column), applied to each vector's partial sums (one group per vector).
  static constexpr bool kGroupScaled = kInt4 || kFp8 || kMxfp4;
  static constexpr bool kGatedKernel = kGated;

  using Chunks = RowChunks<kRows, kThreads>;
  using SharedStorage = typename Chunks::Storage;

  static __device__ void run(const Params& p, SharedStorage& shared) {
    const int total_chunks = Chunks::scan(p, shared);
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
      Chunks::locate(p, shared, chunk, e, first, rows);
      compute(p, e, first, rows, col_tile * kCols + warp * kColsPerWarp, n_total, k_total,
              lane);
    }
  }

  // int4 zero points with a fraction: partial sums of q - round(z) become those of q - z by
  // adding (round(z) - z) times the vector's activation sum (activations read again: cached).
  static __device__ __forceinline__ void add_zero_fraction(const Element* const (&a_rows)[kRows],
                                                        int64_t k,
                                                        const float (&zero)[kColsPerWarp][kHalves],
                                                        float (&partial)[kColsPerWarp][kHalves]
                                                                        [kRows]) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      float a_sum = 0.0f;
      for (int part = 0; part < kVec / 8; ++part) {
        float a[8];
        to_float(load_cached(a_rows[m] + k + part * 8), Element(), a);
#pragma unroll
        for (int i = 0; i < 8; ++i) a_sum += a[i];
      }
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
        for (int h = 0; h < kHalves; ++h)
          partial[c][h][m] = fmaf(rintf(zero[c][h]) - zero[c][h], a_sum, partial[c][h][m]);
    }
  }

  static __device__ __forceinline__ void compute(const Params& p, int e, int first, int rows,
                                                 int64_t col0, int64_t n_total, int64_t k_total,
                                                 int lane) {
    if (col0 >= n_total) return;
    const int64_t lda = p.lda[e];
    const int64_t ldb = p.ldb[e];
    const Element* a_base = static_cast<const Element*>(p.ptr_a[e]);
    const Element* a_rows[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      const int row = first + (m < rows ? m : rows - 1);  // padding rows repeat the last one
      const int64_t source = kGated ? static_cast<int64_t>(p.ptr_rows[e][row]) : row;
      a_rows[m] = a_base + source * lda;
    }
    // Weight rows as bytes (ldb counts elements; int4 packs two per byte).
    const char* b = static_cast<const char*>(p.ptr_b[e]);
    const char* w_rows[kColsPerWarp][kHalves];
    int64_t w_cols[kColsPerWarp][kHalves];  // the weight row's column in the scale rows
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) {
      const int64_t n = col0 + c < n_total ? col0 + c : n_total - 1;  // past N: repeat, unstored
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        w_cols[c][h] = n + h * n_total;
        w_rows[c][h] = b + w_cols[c][h] * ldb * kWeightBits / 8;
      }
    }
    // Group-scaled weights: scale (int4: and zero point) rows of kHalves * N columns, one row
    // per K-group; int4 scales in the activation dtype, fp8's float32, mxfp4's e8m0 bytes.
    const void* group_scales = kGroupScaled ? p.ptr_scale[e] : nullptr;
    const Element* group_zeros =
        kInt4 && p.ptr_zero != nullptr ? static_cast<const Element*>(p.ptr_zero[e]) : nullptr;
    const int64_t scale_ld = kHalves * n_total;

    float acc[kColsPerWarp][kHalves][kRows];
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int m = 0; m < kRows; ++m) acc[c][h][m] = 0.0f;

    for (int64_t k_base = int64_t(lane) * kVec; k_base < k_total; k_base += kUnroll * kStep) {
      uint4 w[kUnroll][kColsPerWarp][kHalves];
      // Group-scaled: each vector's scale (int4: and zero point), read with its weights.
      float group_scale[kGroupScaled ? kUnroll : 1][kColsPerWarp][kHalves];
      float group_zero[kInt4 ? kUnroll : 1][kColsPerWarp][kHalves];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k_base + u * kStep;
#pragma unroll
        for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
          for (int h = 0; h < kHalves; ++h) {
            w[u][c][h] = k < k_total ? load_streaming(w_rows[c][h] + k * kWeightBits / 8)
                                     : make_uint4(0, 0, 0, 0);
            if constexpr (kGroupScaled) {
              const int64_t at =
                  (k < k_total ? k / p.group_size : 0) * scale_ld + w_cols[c][h];
              if constexpr (kInt4) {
                group_scale[u][c][h] = to_float(static_cast<const Element*>(group_scales)[at]);
                group_zero[u][c][h] = group_zeros != nullptr ? to_float(group_zeros[at]) : 8.0f;
              } else if constexpr (kFp8) {
                group_scale[u][c][h] = static_cast<const float*>(group_scales)[at];
              } else {
                group_scale[u][c][h] = e8m0_value(static_cast<const uint8_t*>(group_scales)[at]);
              }
            }
          }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k_base + u * kStep;
        if (k >= k_total) break;
        // Products in K order, 8 weights at a time (few live registers): into the accumulators,
        // or, for group-scaled weights, into the vector's partial sums, scaled once after.
        float partial[kColsPerWarp][kHalves][kRows];
        auto* target = kGroupScaled ? partial : acc;
        if constexpr (kGroupScaled) {
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
            for (int h = 0; h < kHalves; ++h)
#pragma unroll
              for (int m = 0; m < kRows; ++m) partial[c][h][m] = 0.0f;
        }
        // int4: q - round(z) exactly per weight (2^23 + q - (2^23 + round(z))); a zero point's
        // fraction (rare: checkpoints store integers) is applied to the vector's activation sum.
        float bias[kInt4 ? kColsPerWarp : 1][kInt4 ? kHalves : 1];
        if constexpr (kInt4) {
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
            for (int h = 0; h < kHalves; ++h) bias[c][h] = 8388608.0f + rintf(group_zero[u][c][h]);
        }
#pragma unroll
        for (int part = 0; part < kVec / 8; ++part) {
          float wf[kColsPerWarp][kHalves][8];
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
            for (int h = 0; h < kHalves; ++h)
              weights8(w[u][c][h], part, Weight(), kInt4 ? bias[kInt4 ? c : 0][kInt4 ? h : 0] : 0.0f,
                       wf[c][h]);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
            float a[8];
            to_float(load_cached(a_rows[m] + k + part * 8), Element(), a);
#pragma unroll
            for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
              for (int h = 0; h < kHalves; ++h)
#pragma unroll
                for (int i = 0; i < 8; ++i)
                  target[c][h][m] = fmaf(wf[c][h][i], a[i], target[c][h][m]);
          }
        }
        if constexpr (kInt4) {
          bool fraction = false;
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
            for (int h = 0; h < kHalves; ++h)
              fraction |= group_zero[u][c][h] != rintf(group_zero[u][c][h]);
          if (fraction) add_zero_fraction(a_rows, k, group_zero[u], partial);
        }
        if constexpr (kGroupScaled) {
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
            for (int h = 0; h < kHalves; ++h)
#pragma unroll
              for (int m = 0; m < kRows; ++m)
                acc[c][h][m] = fmaf(group_scale[u][c][h], partial[c][h][m], acc[c][h][m]);
        }
      }
    }

    // Butterfly sums: every lane ends with every total, added in the same order everywhere.
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int m = 0; m < kRows; ++m)
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2)
            acc[c][h][m] += __shfl_xor_sync(0xffffffffu, acc[c][h][m], offset);

    // Lane c * kRows + m stores column c of row m.
    const Element* scales = kInt8 ? static_cast<const Element*>(p.ptr_scale[e]) : nullptr;
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (lane != c * kRows + m) continue;
        const int64_t n = col0 + c;
        if (m >= rows || n >= n_total) continue;
        float out[kHalves];
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          out[h] = acc[c][h][m] * (kInt8 ? to_float(scales[n + h * n_total]) : 1.0f);
        }
        store_output<Element, kGated>(p, e, first + m, n, n_total, out[0], out[kHalves - 1]);
      }
    }
  }
};

template <typename K>
__global__ void __launch_bounds__(K::kThreads) decode_gemm_kernel(Params params) {
  wait_on_dependencies();
  __shared__ typename K::SharedStorage shared;
  K::run(params, shared);
}

// The host side of a decode kernel K: the interface every grouped-GEMM tactic has (see
// tactic.h).
template <typename K>
struct DecodeLauncher {
  static constexpr int kThreads = K::kThreads;
  static constexpr int kSmemBytes = int(sizeof(typename K::SharedStorage));

  static int prepare() {
    int blocks_per_sm = 0;
    CUTLASS_MOE_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks_per_sm, decode_gemm_kernel<K>, kThreads, 0));
    return blocks_per_sm;
  }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    if (a.problem_count > kMaxExperts) {
      throw InvalidArgument("decode GEMM: more than " + std::to_string(kMaxExperts) +
                            " local experts");
    }
    if (K::kGatedKernel && a.ptr_rows == nullptr) {
      throw InvalidArgument("decode GEMM: the gated variant needs the row-index arrays");
    }
    if (K::kInt8 && a.ptr_scale == nullptr) {
      throw InvalidArgument("decode GEMM: int8 weights need their per-column scales");
    }
    if (K::kGroupScaled &&
        (a.ptr_scale == nullptr || a.group_size <= 0 || a.group_size % 32 != 0)) {
      throw InvalidArgument("decode GEMM: group-scaled weights need their scales and a group size "
                            "that is a positive multiple of 32 (got " +
                            std::to_string(a.group_size) + ")");
    }
    Params params;
    params.problem_sizes = static_cast<const cutlass::gemm::GemmCoord*>(a.problem_sizes);
    params.problem_count = a.problem_count;
    params.ptr_a = a.ptr_a;
    params.ptr_b = a.ptr_b;
    params.ptr_d = a.ptr_d;
    params.lda = a.lda;
    params.ldb = a.ldb;
    params.ldd = a.ldd;
    params.ptr_scale = a.ptr_scale;
    params.ptr_zero = a.ptr_zero;
    params.group_size = a.group_size;
    params.ptr_rows = a.ptr_rows;
    params.gated = a.gated;
    launch_kernel("decode GEMM", decode_gemm_kernel<K>, dim3(threadblock_count), dim3(kThreads),
                  0, stream, a.pdl, params);
  }
};

// The FMA decode tactic (see the top of this file).
template <typename Element, typename Weight, int kRows, int kColsPerWarp, int kWarps,
          int kUnroll, bool kGated>
struct DecodeGemm
    : DecodeLauncher<Kernel<Element, Weight, kRows, kColsPerWarp, kWarps, kUnroll, kGated>> {};

}  // namespace decode
}  // namespace grouped_gemm
}  // namespace cutlass_moe
