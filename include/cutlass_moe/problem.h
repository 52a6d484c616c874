// One MoE call: shapes, options and device pointers shared by routing, GEMMs and finalize.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cutlass_moe {

// Element types crossing the Python boundary (values are part of the binding's ABI).
enum class DType : int {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kInt8 = 3,
};

// Activations between GEMM1 and GEMM2 (values are part of the binding's ABI).
enum class Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,   // tanh approximation-free erf GELU
  kSilu = 3,
  kSwiglu = 4,  // gated: up = h[:, :I], gate = h[:, I:], a = up * silu(gate)
  kGeglu = 5,   // gated: a = up * gelu(gate)
};

inline bool is_gated(Activation act) {
  return act == Activation::kSwiglu || act == Activation::kGeglu;
}

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kInt8:
      return 1;
  }
  return 0;
}

// Short name used in tactic names, messages and build info ("fp16", "bf16", "fp32", "int8").
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat32:
      return "fp32";
    case DType::kInt8:
      return "int8";
  }
  return "unknown";
}

// Shapes and options of one call. All sizes are this rank's local sizes.
struct MoeProblem {
  int64_t num_tokens = 0;   // T
  int64_t hidden_size = 0;  // H
  int64_t inter_size = 0;   // I (this TP rank's slice)
  int num_experts = 0;      // E_local
  int top_k = 0;            // k
  int expert_start = 0;     // first global expert id owned by this rank (ep_rank * E_local)
  Activation activation = Activation::kSwiglu;

  int64_t expanded_rows() const { return num_tokens * top_k; }
  // Columns of GEMM1's output: 2*I for gated activations (up rows, then gate rows), else I.
  int64_t fc1_out_size() const { return is_gated(activation) ? 2 * inter_size : inter_size; }
};

// Device pointers of one call. Null means "absent" for the optional ones.
struct MoePointers {
  const void* input = nullptr;                     // [T, H] activation dtype
  const int32_t* token_selected_experts = nullptr;  // [T, k] global expert ids
  const float* token_final_scales = nullptr;        // [T, k]
  const void* fc1_weights = nullptr;                // [E, N1, H] weight dtype, N1 = fc1_out_size()
  const void* fc2_weights = nullptr;                // [E, H, I]  weight dtype
  const void* fc1_bias = nullptr;                   // [E, N1] activation dtype, optional
  const void* fc2_bias = nullptr;                   // [E, H]  activation dtype, optional
  const void* fc1_scales = nullptr;  // [E, N1] activation dtype: per-channel scales, int8 only
  const void* fc2_scales = nullptr;  // [E, H]  activation dtype: per-channel scales, int8 only
  const float* swiglu_alpha = nullptr;              // [E] optional (clamped SwiGLU)
  const float* swiglu_beta = nullptr;               // [E] optional
  const float* swiglu_limit = nullptr;              // [E] optional
  void* output = nullptr;                           // [T, H] output dtype
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

}  // namespace cutlass_moe
