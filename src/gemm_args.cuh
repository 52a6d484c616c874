// The grouped GEMMs' device-resident arguments (problem sizes, pointers, leading dimensions),
// written on the device from the routed row offsets: one expert at a time, by whichever kernel
// has just computed expert_first_token_offset (routing, or the profiling set-up).
#pragma once

#include <cstdint>

#include "cutlass/gemm_coord.h"

namespace cutlass_moe {

// Device-side view of one grouped GEMM's argument arrays (one entry per problem).
struct GemmArgsDevice {
  cutlass::gemm::GemmCoord* problem_sizes;
  void** ptr_a;
  void** ptr_b;
  void** ptr_d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
  void** ptr_scale;
  void** ptr_zero;
  int32_t** ptr_rows;
};

// Both GEMMs' operands in bytes; GEMM2's A is the activation output (or GEMM1's output directly
// when there is no elementwise stage). The fused gated GEMM1 reads `tokens` through
// `permuted_token` and writes `act_out`. A GEMM2 split over K writes fp32 partial sums to
// `fc2_partials`: `splits` slices of [T*k, H].
struct GemmOperands {
  const char* tokens;
  const int32_t* permuted_token;
  char* act_out;
  const char* gathered;
  const char* fc1_weights;
  // Weight scales (activation dtype): int8 [E, N1] / [E, H]; int4 [E, H/G1, N1] / [E, I/G2, H];
  // int4 zero points shaped like the scales (null: symmetric). Null for 16-bit weights.
  const char* fc1_scales;
  const char* fc1_zeros;
  char* fc1_out;
  const char* gemm2_a;
  const char* fc2_weights;
  const char* fc2_scales;
  const char* fc2_zeros;
  char* fc2_out;
  char* fc2_partials;
};

// K of split s when K is cut into `splits` slices of ceil(K / splits) rounded up to 16 elements
// (16-byte aligned operand offsets for 16-bit and int8 weights alike): [begin, begin + length).
// Trailing slices may be empty (length 0) when K is small; their GEMMs write zeros.
__host__ __device__ inline void split_k_slice(int64_t k, int splits, int s, int64_t* begin,
                                              int64_t* length) {
  const int64_t per_split = ((k + splits - 1) / splits + 15) / 16 * 16;
  const int64_t first = per_split * s;
  *begin = first < k ? first : k;
  const int64_t rest = k - *begin;
  *length = rest < per_split ? rest : per_split;
}

struct GemmArgsWriter {
  int num_experts;
  int64_t hidden;    // H
  int64_t fc1_cols;  // N1
  int64_t inter;     // I
  int elem_bytes;
  int weight_bits;       // 16, 8 or 4
  int scale_bytes;       // one weight scale: activation dtype, or 4 (fp8), 1 (mxfp4)
  int64_t fc1_scale_rows;  // rows of one expert's fc1 scales: 1 (int8), H / G1 (int4)
  int64_t fc2_scale_rows;  // likewise for fc2: 1, or I / G2
  GemmOperands ops;
  GemmArgsDevice gemm1;        // plain GEMM1 (A = gathered rows, D = fc1_out)
  GemmArgsDevice gemm2;        // GEMM2 (D = fc2_out)
  GemmArgsDevice gemm1_gated;  // fused gated GEMM1 (16-bit weights, gated activations)
  GemmArgsDevice gemm2_split;  // GEMM2 split over K: problem s * E + e (when gemm2_splits > 1)
  int gemm2_splits;            // 1: no split-K set is written
  int64_t partial_rows;        // rows of one fp32 partial slice (T*k)

  // Problem `index` of `g`: D[rows, n] = A[rows, k] * W[n, k]^T (+ weight scales and zeros),
  // with A, W and D given at their first element and their leading dimensions (in elements).
  __device__ static void write_problem(GemmArgsDevice g, int index, int rows, int64_t n,
                                       int64_t k, const char* a, int64_t lda, const char* w,
                                       int64_t ldw, const char* scales, const char* zeros,
                                       char* d, int64_t ldd) {
    g.problem_sizes[index] =
        cutlass::gemm::GemmCoord(rows, static_cast<int>(n), static_cast<int>(k));
    g.ptr_a[index] = const_cast<char*>(a);
    g.ptr_b[index] = const_cast<char*>(w);
    g.ptr_scale[index] = const_cast<char*>(scales);
    g.ptr_zero[index] = const_cast<char*>(zeros);
    g.ptr_rows[index] = nullptr;
    g.ptr_d[index] = d;
    g.lda[index] = lda;
    g.ldb[index] = ldw;
    g.ldd[index] = ldd;
  }

  // Every argument set's entries for expert e, whose rows are [first_row, first_row + rows).
  __device__ void write(int e, int64_t first_row, int rows) const {
    const int64_t eb = elem_bytes;
    const int64_t wbits = weight_bits;
    const char* fc1_w = ops.fc1_weights + e * fc1_cols * hidden * wbits / 8;
    // Zero points (int4) are in the activation dtype, like int4's scales.
    const int64_t fc1_s_offset = e * fc1_scale_rows * fc1_cols;
    const char* fc1_s = ops.fc1_scales ? ops.fc1_scales + fc1_s_offset * scale_bytes : nullptr;
    const char* fc1_z = ops.fc1_zeros ? ops.fc1_zeros + fc1_s_offset * eb : nullptr;
    write_problem(gemm1, e, rows, fc1_cols, hidden, ops.gathered + first_row * hidden * eb,
                  hidden, fc1_w, hidden, fc1_s, fc1_z, ops.fc1_out + first_row * fc1_cols * eb,
                  fc1_cols);
    const char* fc2_w = ops.fc2_weights + e * hidden * inter * wbits / 8;
    const int64_t fc2_s_offset = e * fc2_scale_rows * hidden;
    const char* fc2_s = ops.fc2_scales ? ops.fc2_scales + fc2_s_offset * scale_bytes : nullptr;
    const char* fc2_z = ops.fc2_zeros ? ops.fc2_zeros + fc2_s_offset * eb : nullptr;
    const char* gemm2_a = ops.gemm2_a + first_row * inter * eb;
    write_problem(gemm2, e, rows, hidden, inter, gemm2_a, inter, fc2_w, inter, fc2_s, fc2_z,
                  ops.fc2_out + first_row * hidden * eb, hidden);
    if (gemm2_splits > 1) {
      // Slice s multiplies columns [begin, begin + length) of A by the same columns of W (a
      // K-contiguous [H, I] matrix) into fp32 slice s of the partials. (No int4 tactic splits
      // over K: the per-column scales below are those of 16-bit and int8 weights.)
      for (int s = 0; s < gemm2_splits; ++s) {
        int64_t begin = 0, length = 0;
        split_k_slice(inter, gemm2_splits, s, &begin, &length);
        char* d = ops.fc2_partials + ((s * partial_rows + first_row) * hidden) * 4;
        write_problem(gemm2_split, s * num_experts + e, rows, hidden, length,
                      gemm2_a + begin * eb, inter, fc2_w + begin * wbits / 8, inter, fc2_s,
                      nullptr, d, hidden);
      }
    }
    // The fused gated set: CUTLASS gated tactics read it for 16-bit weights, the decode kernels
    // for any weights (with the quantised weights' scales and zeros, whose rows hold the up
    // columns then the gate columns).
    if (fc1_cols == 2 * inter) {
      gemm1_gated.problem_sizes[e] =
          cutlass::gemm::GemmCoord(rows, static_cast<int>(inter), static_cast<int>(hidden));
      gemm1_gated.ptr_a[e] = const_cast<char*>(ops.tokens);
      gemm1_gated.ptr_rows[e] = const_cast<int32_t*>(ops.permuted_token + first_row);
      gemm1_gated.ptr_b[e] = const_cast<char*>(fc1_w);
      gemm1_gated.ptr_scale[e] = const_cast<char*>(fc1_s);
      gemm1_gated.ptr_zero[e] = const_cast<char*>(fc1_z);
      gemm1_gated.ptr_d[e] = ops.act_out + first_row * inter * eb;
      gemm1_gated.lda[e] = hidden;
      gemm1_gated.ldb[e] = hidden;
      gemm1_gated.ldd[e] = inter;
    }
  }
};

}  // namespace cutlass_moe
