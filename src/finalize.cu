// Finalize: unpermute, weight by router scales, add fc2 bias, sum over the k choices
// (see finalize.h).
//
// One launch: blockIdx.x = token, blockIdx.y = column tile, each thread one group of kWidth
// output columns (8 -> one 16-byte load per choice, or 1 for the scalar fallback). The k choices
// are accumulated in fp32 in the order j = 0..k-1, so the result is deterministic and needs no
// atomics. Common k are compile-time constants so the k row loads are issued back to back.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <string>

#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/finalize.h"
#include "cutlass_moe/problem.h"
#include "launch.cuh"
#include "vector_access.cuh"

namespace cutlass_moe {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr int kMaxGridY = 65535;
constexpr int kRuntimeTopK = 0;  // template value meaning "k is a kernel argument"

using namespace vector_access;

// In: GEMM2's output type (the activation dtype, or fp32 partial sums); Bias: the activation
// dtype; Out: the output dtype.
template <typename In, typename Bias, typename Out, int kWidth, int kFixedTopK>
__global__ void __launch_bounds__(kMaxThreads)
    finalize_kernel(const In* __restrict__ fc2_out, const int32_t* __restrict__ source_to_permuted,
                    const int32_t* __restrict__ token_selected_experts,
                    const float* __restrict__ token_final_scales, const Bias* __restrict__ fc2_bias,
                    int expert_start, int64_t num_tokens, int runtime_top_k, int64_t hidden_size,
                    int splits, Out* __restrict__ out) {
  wait_on_dependencies();
  const int top_k = kFixedTopK != kRuntimeTopK ? kFixedTopK : runtime_top_k;
  const int64_t token = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kWidth;
  if (col >= hidden_size) return;

  float acc[kWidth];
#pragma unroll
  for (int i = 0; i < kWidth; ++i) acc[i] = 0.0f;

  // acc += s * (y + b2_e) for choice j; skipped when the choice's expert is not on this rank.
  auto add_choice = [&](int j) {
    const int32_t permuted_row = source_to_permuted[token + j * num_tokens];
    if (permuted_row < 0) return;
    const int64_t flat = token * top_k + j;
    const float scale = token_final_scales[flat];
    float y[kWidth];
    const In* row = fc2_out + permuted_row * hidden_size + col;
    load_floats<In, kWidth>(row, y);
    // Split-K partial sums (fp32 only): slices of [T*k, H], added in slice order.
    for (int s = 1; s < splits; ++s) {
      float part[kWidth];
      load_floats<In, kWidth>(row + s * num_tokens * top_k * hidden_size, part);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) y[i] += part[i];
    }
    if (fc2_bias != nullptr) {
      // In range: routing kept this choice, so its id lies in [expert_start, expert_start + E).
      const int64_t expert = static_cast<int64_t>(token_selected_experts[flat]) - expert_start;
      float bias[kWidth];
      load_floats<Bias, kWidth>(fc2_bias + expert * hidden_size + col, bias);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) y[i] += bias[i];
    }
#pragma unroll
    for (int i = 0; i < kWidth; ++i) acc[i] = fmaf(scale, y[i], acc[i]);
  };

  if constexpr (kFixedTopK != kRuntimeTopK) {
#pragma unroll
    for (int j = 0; j < kFixedTopK; ++j) add_choice(j);
  } else {
    for (int j = 0; j < top_k; ++j) add_choice(j);
  }

  store_floats<Out, kWidth>(out + token * hidden_size + col, acc);
}

struct LaunchArgs {
  const void* fc2_out;
  const int32_t* source_to_permuted;
  const int32_t* token_selected_experts;
  const float* token_final_scales;
  const void* fc2_bias;
  int expert_start;
  int64_t num_tokens;
  int top_k;
  int64_t hidden_size;
  void* out;
  cudaStream_t stream;
  int splits;
  bool pdl;
};

template <typename In, typename Bias, typename Out, int kWidth, int kFixedTopK>
void launch_typed(const LaunchArgs& args) {
  // Spread a row's column groups evenly over the fewest tiles of at most kMaxThreads threads.
  const int64_t groups = ceil_div(args.hidden_size, kWidth);
  const int64_t tiles = ceil_div(groups, kMaxThreads);
  if (tiles > kMaxGridY) throw InvalidArgument("finalize: hidden_size too large");
  const int threads = static_cast<int>(ceil_div(ceil_div(groups, tiles), kWarpSize) * kWarpSize);
  const dim3 grid(static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(tiles));
  launch_kernel("finalize_kernel", finalize_kernel<In, Bias, Out, kWidth, kFixedTopK>, grid,
                dim3(threads), 0, args.stream, args.pdl, static_cast<const In*>(args.fc2_out),
                args.source_to_permuted, args.token_selected_experts, args.token_final_scales,
                static_cast<const Bias*>(args.fc2_bias), args.expert_start, args.num_tokens,
                args.top_k, args.hidden_size, args.splits, static_cast<Out*>(args.out));
}

template <typename In, typename Bias, typename Out>
void launch_out_typed(const LaunchArgs& args) {
  const bool vectorised = vectorisable(args.hidden_size, {args.fc2_out, args.out, args.fc2_bias});
  if (!vectorised) return launch_typed<In, Bias, Out, 1, kRuntimeTopK>(args);
  switch (args.top_k) {
    case 1:
      return launch_typed<In, Bias, Out, kVectorWidth, 1>(args);
    case 2:
      return launch_typed<In, Bias, Out, kVectorWidth, 2>(args);
    case 4:
      return launch_typed<In, Bias, Out, kVectorWidth, 4>(args);
    case 6:
      return launch_typed<In, Bias, Out, kVectorWidth, 6>(args);
    case 8:
      return launch_typed<In, Bias, Out, kVectorWidth, 8>(args);
    default:
      return launch_typed<In, Bias, Out, kVectorWidth, kRuntimeTopK>(args);
  }
}

template <typename In, typename Bias>
void launch_in_typed(DType out_dtype, const LaunchArgs& args) {
  switch (out_dtype) {
    case DType::kFloat16:
      return launch_out_typed<In, Bias, __half>(args);
    case DType::kBFloat16:
      return launch_out_typed<In, Bias, __nv_bfloat16>(args);
    case DType::kFloat32:
      return launch_out_typed<In, Bias, float>(args);
    default:
      throw InvalidArgument("finalize: out_dtype must be float16, bfloat16 or float32");
  }
}

// GEMM2's output is in the activation dtype, or fp32 partial sums when split over K.
template <typename Act>
void launch_act_typed(DType out_dtype, const LaunchArgs& args) {
  if (args.splits > 1) return launch_in_typed<float, Act>(out_dtype, args);
  launch_in_typed<Act, Act>(out_dtype, args);
}

}  // namespace

void launch_finalize(DType in_dtype, DType out_dtype, const void* fc2_out,
                     const int32_t* source_to_permuted, const int32_t* token_selected_experts,
                     const float* token_final_scales, const void* fc2_bias, int expert_start,
                     int64_t num_tokens, int top_k, int64_t hidden_size, void* out,
                     cudaStream_t stream, int splits, bool pdl) {
  if (in_dtype != DType::kFloat16 && in_dtype != DType::kBFloat16) {
    throw InvalidArgument("finalize: in_dtype must be float16 or bfloat16");
  }
  if (splits < 1) throw InvalidArgument("finalize: splits must be >= 1");
  if (out_dtype != DType::kFloat16 && out_dtype != DType::kBFloat16 &&
      out_dtype != DType::kFloat32) {
    throw InvalidArgument("finalize: out_dtype must be float16, bfloat16 or float32");
  }
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();  // the maps are int32
  if (num_tokens < 0 || num_tokens > kMaxRows) {
    throw InvalidArgument("finalize: num_tokens must be in [0, 2^31)");
  }
  if (top_k < 1 || num_tokens * top_k > kMaxRows) {
    throw InvalidArgument("finalize: top_k must be >= 1 and num_tokens * top_k < 2^31");
  }
  if (hidden_size < 0) throw InvalidArgument("finalize: hidden_size must be >= 0");
  if (num_tokens == 0 || hidden_size == 0) return;  // out has no elements
  if (fc2_out == nullptr || source_to_permuted == nullptr || token_final_scales == nullptr ||
      out == nullptr || (fc2_bias != nullptr && token_selected_experts == nullptr)) {
    throw InvalidArgument("finalize: a required device pointer is null");
  }

  const LaunchArgs args{fc2_out,    source_to_permuted, token_selected_experts,
                        token_final_scales, fc2_bias, expert_start,
                        num_tokens, top_k,  hidden_size,
                        out,        stream,             splits,
                        pdl};
  if (in_dtype == DType::kFloat16) {
    launch_act_typed<__half>(out_dtype, args);
  } else {
    launch_act_typed<__nv_bfloat16>(out_dtype, args);
  }
}

}  // namespace cutlass_moe
