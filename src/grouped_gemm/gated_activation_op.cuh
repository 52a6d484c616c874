// The fused gated GEMM1's combining op: out = gated(gate, up) on one access of both halves,
// where gate and up are GEMM1's two outputs (already rounded to the activation dtype, with the
// fc1 bias added, exactly as the unfused path's GEMM1 output is) and the gated activation is any
// of activation_math::gated's: SwiGLU (plain or gpt-oss's clamped form), GeGLU (erf or tanh
// GELU), SwiGLU-step or SiTU-GLU.
#pragma once

#include "activation_math.cuh"
#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass_moe/problem.h"

namespace cutlass_moe {
namespace grouped_gemm {

// Launch-wide description of the gated activation; per-expert parameters are looked up with
// the problem (local expert) index (activation_math::gated_params).
struct GatedActivationParams {
  int activation = static_cast<int>(Activation::kSwiglu);  // a gated Activation (is_gated)
  const float* swiglu_alpha = nullptr;                      // [E] each optional
  const float* swiglu_beta = nullptr;
  const float* swiglu_limit = nullptr;  // Swiglu; SwigluStep (default 7)
  const float* situ_beta = nullptr;     // Situ (default 4)
  const float* situ_linear_beta = nullptr;  // Situ (default 25)
};

template <typename Element, int kCount>
class GatedActivationOp {
 public:
  using Fragment = cutlass::Array<Element, kCount>;

  CUTLASS_DEVICE
  GatedActivationOp(GatedActivationParams const& params, int expert)
      : activation_(params.activation), params_(activation_math::gated_params(params, expert)) {}

  CUTLASS_DEVICE
  Fragment operator()(Fragment const& gate, Fragment const& up) const {
    cutlass::NumericArrayConverter<float, Element, kCount> to_float;
    cutlass::NumericArrayConverter<Element, float, kCount> to_output;
    const cutlass::Array<float, kCount> g = to_float(gate);
    const cutlass::Array<float, kCount> u = to_float(up);
    cutlass::Array<float, kCount> result;
    // One branch per fragment (the activation is uniform over the launch), then a plain loop.
    switch (static_cast<Activation>(activation_)) {
      case Activation::kGeglu:
        apply<Activation::kGeglu>(g, u, result);
        break;
      case Activation::kGegluTanh:
        apply<Activation::kGegluTanh>(g, u, result);
        break;
      case Activation::kSwigluStep:
        apply<Activation::kSwigluStep>(g, u, result);
        break;
      case Activation::kSitu:
        apply<Activation::kSitu>(g, u, result);
        break;
      default:
        apply<Activation::kSwiglu>(g, u, result);
        break;
    }
    return to_output(result);
  }

 private:
  template <Activation kAct>
  CUTLASS_DEVICE void apply(cutlass::Array<float, kCount> const& g,
                            cutlass::Array<float, kCount> const& u,
                            cutlass::Array<float, kCount>& result) const {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) result[i] = activation_math::gated<kAct>(g[i], u[i], params_);
  }

  int activation_;
  activation_math::GatedParams params_;
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
