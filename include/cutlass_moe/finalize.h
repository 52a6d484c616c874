// Finalize: unpermute, weight by router scales, add fc2 bias, sum over the k choices.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cutlass_moe/problem.h"

namespace cutlass_moe {

// out[t, :] = sum_j  s[t, j] * ( fc2_out[source_to_permuted[t + j*T], :] + fc2_bias[e_tj, :] )
// over the choices j whose source_to_permuted entry is >= 0, where
// e_tj = token_selected_experts[t*k + j] - expert_start (bias only when fc2_bias is non-null).
// fp32 accumulation in a fixed order (deterministic, no atomics); every element of out is written
// (a token with no local expert gets a zero row). in_dtype (the activation dtype, also fc2_bias's):
// kFloat16/kBFloat16; out_dtype: kFloat16/kBFloat16/kFloat32.
// splits > 1: fc2_out holds the fp32 partial sums of a GEMM2 split over K, `splits` slices
// [T*k, H] one after another; a row's value is their sum, taken in slice order (deterministic).
void launch_finalize(DType in_dtype, DType out_dtype, const void* fc2_out,
                     const int32_t* source_to_permuted, const int32_t* token_selected_experts,
                     const float* token_final_scales, const void* fc2_bias, int expert_start,
                     int64_t num_tokens, int top_k, int64_t hidden_size, void* out,
                     cudaStream_t stream, int splits = 1, bool pdl = false);

}  // namespace cutlass_moe
