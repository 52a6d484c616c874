// Elementwise stage between GEMM1 and GEMM2: fc1 bias, then the activation (see activation.h).
//
// One launch: blockIdx.x = permuted row, blockIdx.y = column tile, each thread one group of
// kWidth output columns (8 -> 16-byte loads/stores, or 1 for the scalar fallback). Rows at or
// past expert_first_token_offset[E] exit at once, so the grid depends only on (T*k, I).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <math_constants.h>

#include <cstdint>
#include <limits>
#include <string>

#include "cutlass_moe/activation.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/problem.h"
#include "activation_math.cuh"
#include "launch.cuh"
#include "vector_access.cuh"

namespace cutlass_moe {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr int kMaxGridY = 65535;

using namespace vector_access;

using activation_math::activate;

// Whether a row needs its expert's per-expert parameters (besides the fc1 bias).
__host__ __device__ inline bool per_expert_params(Activation act, const ActivationParams& p) {
  switch (act) {
    case Activation::kSwiglu:
    case Activation::kSwigluStep:
      return p.swiglu_alpha != nullptr || p.swiglu_beta != nullptr || p.swiglu_limit != nullptr;
    case Activation::kSitu:
      return p.situ_beta != nullptr || p.situ_linear_beta != nullptr;
    default:
      return false;
  }
}

template <typename T, Activation kAct, int kWidth>
__global__ void __launch_bounds__(kMaxThreads)
    activation_kernel(const T* __restrict__ fc1_out, T* __restrict__ act_out, int64_t inter_size,
                      const int64_t* __restrict__ expert_first_token_offset, int num_experts,
                      const int32_t* __restrict__ permuted_expert, const T* __restrict__ fc1_bias,
                      ActivationParams params) {
  constexpr bool kGated = is_gated(kAct);
  wait_on_dependencies();
  allow_dependents();
  const int64_t row = blockIdx.x;
  if (row >= expert_first_token_offset[num_experts]) return;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kWidth;
  if (col >= inter_size) return;

  const int64_t in_cols = kGated ? 2 * inter_size : inter_size;
  const bool per_expert = per_expert_params(kAct, params);
  // Only read the expert id when something per-expert is needed.
  const int expert = (fc1_bias != nullptr || per_expert) ? permuted_expert[row] : 0;

  // Gated: the first I columns are "up", the second I "gate" (FlashInfer / TRT-LLM order).
  float up[kWidth];
  float gate[kWidth];
  load_floats<T, kWidth>(fc1_out + row * in_cols + col, up);
  if constexpr (kGated) load_floats<T, kWidth>(fc1_out + row * in_cols + inter_size + col, gate);
  if (fc1_bias != nullptr) {
    float bias[kWidth];
    const T* bias_row = fc1_bias + expert * in_cols;
    load_floats<T, kWidth>(bias_row + col, bias);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) up[i] += bias[i];
    if constexpr (kGated) {
      load_floats<T, kWidth>(bias_row + inter_size + col, bias);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) gate[i] += bias[i];
    }
  }

  float result[kWidth];
  if constexpr (kGated) {
    const activation_math::GatedParams gp =
        per_expert ? activation_math::gated_params(params, expert) : activation_math::GatedParams{};
#pragma unroll
    for (int i = 0; i < kWidth; ++i) result[i] = activation_math::gated<kAct>(gate[i], up[i], gp);
  } else if constexpr (kAct == Activation::kClampedRelu2) {
    const float limit =
        params.clamped_relu2_limit != nullptr ? params.clamped_relu2_limit[0] : 1.0f;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) result[i] = activation_math::clamped_relu2(up[i], limit);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) result[i] = activate<kAct>(up[i]);
  }
  store_floats<T, kWidth>(act_out + row * inter_size + col, result);
}

struct LaunchArgs {
  const void* fc1_out;
  void* act_out;
  int64_t expanded_rows;
  int64_t inter_size;
  const int64_t* expert_first_token_offset;
  int num_experts;
  const int32_t* permuted_expert;
  const void* fc1_bias;
  ActivationParams params;
  cudaStream_t stream;
  bool pdl;
};

template <typename T, Activation kAct, int kWidth>
void launch_typed(const LaunchArgs& args) {
  // Spread a row's column groups evenly over the fewest tiles of at most kMaxThreads threads.
  const int64_t groups = ceil_div(args.inter_size, kWidth);
  const int64_t tiles = ceil_div(groups, kMaxThreads);
  if (tiles > kMaxGridY) throw InvalidArgument("activation: inter_size too large");
  const int threads = static_cast<int>(ceil_div(ceil_div(groups, tiles), kWarpSize) * kWarpSize);
  const dim3 grid(static_cast<unsigned>(args.expanded_rows), static_cast<unsigned>(tiles));
  launch_kernel("activation_kernel", activation_kernel<T, kAct, kWidth>, grid, dim3(threads), 0,
                args.stream, args.pdl, static_cast<const T*>(args.fc1_out),
                static_cast<T*>(args.act_out), args.inter_size, args.expert_first_token_offset,
                args.num_experts, args.permuted_expert, static_cast<const T*>(args.fc1_bias),
                args.params);
}

template <typename T, Activation kAct>
void launch_width(const LaunchArgs& args) {
  // fc1_out rows hold 2I (gated) or I elements: both multiples of 8 when I is.
  const bool vectorised = vectorisable(args.inter_size, {args.fc1_out, args.act_out, args.fc1_bias});
  if (vectorised) {
    launch_typed<T, kAct, kVectorWidth>(args);
  } else {
    launch_typed<T, kAct, 1>(args);
  }
}

template <typename T>
void launch_activation_fn(Activation activation, const LaunchArgs& args) {
  switch (activation) {
    case Activation::kIdentity:
      return launch_width<T, Activation::kIdentity>(args);
    case Activation::kRelu:
      return launch_width<T, Activation::kRelu>(args);
    case Activation::kGelu:
      return launch_width<T, Activation::kGelu>(args);
    case Activation::kSilu:
      return launch_width<T, Activation::kSilu>(args);
    case Activation::kSwiglu:
      return launch_width<T, Activation::kSwiglu>(args);
    case Activation::kGeglu:
      return launch_width<T, Activation::kGeglu>(args);
    case Activation::kRelu2:
      return launch_width<T, Activation::kRelu2>(args);
    case Activation::kSwigluStep:
      return launch_width<T, Activation::kSwigluStep>(args);
    case Activation::kGegluTanh:
      return launch_width<T, Activation::kGegluTanh>(args);
    case Activation::kSitu:
      return launch_width<T, Activation::kSitu>(args);
    case Activation::kClampedRelu2:
      return launch_width<T, Activation::kClampedRelu2>(args);
  }
  throw InvalidArgument("activation: unknown activation enum value " +
                        std::to_string(static_cast<int>(activation)));
}

}  // namespace

void launch_activation(DType dtype, Activation activation, const void* fc1_out, void* act_out,
                       int64_t expanded_rows, int64_t inter_size,
                       const int64_t* expert_first_token_offset, int num_experts,
                       const int32_t* permuted_expert, const void* fc1_bias,
                       const ActivationParams& params, cudaStream_t stream, bool pdl) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    throw InvalidArgument("activation: dtype must be float16 or bfloat16");
  }
  if (expanded_rows < 0 || expanded_rows > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("activation: expanded_rows must be in [0, 2^31)");
  }
  if (inter_size < 0) throw InvalidArgument("activation: inter_size must be >= 0");
  if (num_experts < 1) throw InvalidArgument("activation: num_experts must be >= 1");
  if (expanded_rows == 0 || inter_size == 0) return;
  if (fc1_out == nullptr || act_out == nullptr || expert_first_token_offset == nullptr) {
    throw InvalidArgument("activation: a required device pointer is null");
  }
  if (!is_valid_activation(static_cast<int>(activation))) {
    throw InvalidArgument("activation: unknown activation enum value " +
                          std::to_string(static_cast<int>(activation)));
  }
  if ((fc1_bias != nullptr || per_expert_params(activation, params)) &&
      permuted_expert == nullptr) {
    throw InvalidArgument(
        "activation: permuted_expert is required with a bias or per-expert activation parameters");
  }

  const LaunchArgs args{fc1_out,          act_out,     expanded_rows,   inter_size,
                        expert_first_token_offset, num_experts, permuted_expert, fc1_bias,
                        params,           stream,      pdl};
  if (dtype == DType::kFloat16) {
    launch_activation_fn<__half>(activation, args);
  } else {
    launch_activation_fn<__nv_bfloat16>(activation, args);
  }
}

}  // namespace cutlass_moe
