// cutlass_moe._C: the pybind11 module. Integers cross the boundary (device pointers, the CUDA
// stream handle, shapes, dtype and activation enums); C++ never owns a tensor and never links
// libtorch. std::invalid_argument becomes ValueError, other exceptions RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <string>

#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/problem.h"
#include "cutlass_moe/runner.h"
#include "cutlass_moe/tactic.h"

#ifndef CUTLASS_MOE_VERSION
#define CUTLASS_MOE_VERSION "0.0.0"
#endif
#ifndef CUTLASS_MOE_CUTLASS_VERSION
#define CUTLASS_MOE_CUTLASS_VERSION "unknown"
#endif
#ifndef CUTLASS_MOE_CUDA_ARCHS
#define CUTLASS_MOE_CUDA_ARCHS ""
#endif
#ifndef CUTLASS_MOE_PTX_ARCHS
#define CUTLASS_MOE_PTX_ARCHS ""
#endif
#ifndef CUTLASS_MOE_FAST_BUILD
#define CUTLASS_MOE_FAST_BUILD 0
#endif

namespace py = pybind11;
using cutlass_moe::Activation;
using cutlass_moe::DType;
using cutlass_moe::MoePointers;
using cutlass_moe::MoeProblem;
using cutlass_moe::MoeRunner;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

MoeProblem make_problem(int64_t num_tokens, int64_t hidden_size, int64_t inter_size,
                        int num_experts, int top_k, int expert_start, int activation) {
  MoeProblem p;
  p.num_tokens = num_tokens;
  p.hidden_size = hidden_size;
  p.inter_size = inter_size;
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.expert_start = expert_start;
  p.activation = static_cast<Activation>(activation);
  return p;
}

DType to_dtype(int value) {
  if (value < 0 || value > static_cast<int>(DType::kMxfp4)) {
    throw cutlass_moe::InvalidArgument("unknown dtype enum " + std::to_string(value));
  }
  return static_cast<DType>(value);
}


py::dict descriptor_dict(const cutlass_moe::TacticDescriptor& d, int gemm) {
  py::dict out;
  out["name"] = d.name;
  out["gemm"] = gemm;
  out["tile_m"] = d.tile_m;
  out["tile_n"] = d.tile_n;
  out["tile_k"] = d.tile_k;
  out["warp_m"] = d.warp_m;
  out["warp_n"] = d.warp_n;
  out["warp_k"] = d.warp_k;
  out["stages"] = d.stages;
  out["smem_bytes"] = d.smem_bytes;
  out["threads"] = d.threads;
  out["runnable"] = d.runnable;
  out["act_dtype"] = cutlass_moe::dtype_name(d.act_dtype);
  out["weight_dtype"] = cutlass_moe::dtype_name(d.weight_dtype);
  // Fused gated GEMM1 tactics run only with the activations they fuse.
  out["gated"] = d.gated;
  out["split_k"] = d.split_k;
  out["decode"] = d.decode;
  // 0: any GPU the build targets; 90: sm_90a code, runnable on compute capability 9.0 only.
  out["required_cc"] = d.required_cc;
  if (d.gated) {
    py::list activations;
    for (int a = 0; a < cutlass_moe::kActivationCount; ++a) {
      if (cutlass_moe::is_gated(static_cast<Activation>(a))) activations.append(a);
    }
    out["activations"] = activations;
  }
  return out;
}

py::list descriptor_list(const MoeRunner& runner, int gemm, bool runnable_only) {
  py::list out;
  for (const auto& d : runner.tactics(gemm, runnable_only)) out.append(descriptor_dict(d, gemm));
  return out;
}

// The entries of a ';'-separated list (empty entries skipped).
py::list split_list(const std::string& spec) {
  py::list out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(';', start);
    if (end == std::string::npos) end = spec.size();
    if (end > start) out.append(spec.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// The CUDA version the installed driver supports, as 1000 * major + 10 * minor (12080 for
// 12.8), or 0 when no NVIDIA driver is installed. Needs no GPU and creates no context.
int driver_cuda_version() {
  int version = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaDriverGetVersion(&version));
  return version;
}

// Test hook: one runtime call that fails without side effects (no device has id -1), through the
// usual check, so it raises RuntimeError. Tests use it to see that the error does not stay
// latched for the next launch check (cudaGetLastError) of an unrelated call.
void fail_cuda_call_for_tests() { CUTLASS_MOE_CHECK_CUDA(cudaSetDevice(-1)); }

py::dict build_info() {
  py::dict info;
  info["version"] = CUTLASS_MOE_VERSION;
  info["cutlass_version"] = CUTLASS_MOE_CUTLASS_VERSION;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
  // The same, as CUDART_VERSION (12080 for 12.8), to compare with driver_cuda_version().
  info["cuda_runtime_version"] = CUDART_VERSION;
  // Archs with machine code (SASS) in the binary, and those with PTX for JIT compilation.
  info["archs"] = split_list(CUTLASS_MOE_CUDA_ARCHS);
  info["ptx_archs"] = split_list(CUTLASS_MOE_PTX_ARCHS);
  info["fast_build"] = static_cast<bool>(CUTLASS_MOE_FAST_BUILD);

  // Tactic counts per dtype configuration and GEMM, from the generated registry (no CUDA call).
  std::map<std::string, std::map<std::string, int>> counts;
  int count = 0;
  const cutlass_moe::GemmTactic* const* all = cutlass_moe::gemm_tactics(&count);
  for (int i = 0; i < count; ++i) {
    const std::string config =
        std::string(cutlass_moe::dtype_name(all[i]->act_dtype)) + "_" +
        cutlass_moe::dtype_name(all[i]->weight_dtype);
    auto& per_gemm = counts[config];
    if (all[i]->gemms & 1) per_gemm["gemm1"] += 1;
    if (all[i]->gemms & 2) per_gemm["gemm2"] += 1;
  }
  py::dict tactics;
  for (const auto& [config, per_gemm] : counts) {
    py::dict d;
    d["gemm1"] = per_gemm.count("gemm1") ? per_gemm.at("gemm1") : 0;
    d["gemm2"] = per_gemm.count("gemm2") ? per_gemm.at("gemm2") : 0;
    tactics[py::str(config)] = d;
  }
  info["tactics"] = tactics;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cutlass_moe native extension: CUTLASS grouped-GEMM MoE kernels (no libtorch)";

  m.attr("SPLIT_K_MAX_ROWS") = cutlass_moe::kSplitKMaxRows;
  m.attr("TILE_GROUP_BYTES") = cutlass_moe::kTileGroupBytes;
  m.def("build_info", &build_info, "Build configuration: versions, archs, tactic counts.");
  m.def("driver_cuda_version", &driver_cuda_version,
        "CUDA version of the installed driver (12080 for 12.8); 0 when there is no driver.");
  m.def("_fail_cuda_call_for_tests", &fail_cuda_call_for_tests,
        "For tests: makes a CUDA runtime call that fails (cudaSetDevice(-1)) and so raises "
        "RuntimeError; the error must not leak into later calls.");

  py::class_<MoeRunner>(m, "MoeRunner")
      .def(py::init([](int act, int weight, int out) {
             return new MoeRunner(to_dtype(act), to_dtype(weight), to_dtype(out));
           }),
           py::arg("act_dtype"), py::arg("weight_dtype"), py::arg("out_dtype"))
      .def(
          "tactics",
          [](const MoeRunner& r, int gemm) { return descriptor_list(r, gemm, true); },
          py::arg("gemm"), "Tactics for GEMM `gemm` (1 or 2) that this GPU can run.")
      .def(
          "all_tactics",
          [](const MoeRunner& r, int gemm) { return descriptor_list(r, gemm, false); },
          py::arg("gemm"), "Every tactic compiled for GEMM `gemm`, runnable or not.")
      .def("pdl_supported", &MoeRunner::pdl_supported,
           "Whether calls use programmatic dependent launch on the current device (sm_90+).")
      .def(
          "workspace_size",
          [](const MoeRunner& r, int64_t num_tokens, int64_t hidden_size, int64_t inter_size,
             int num_experts, int top_k, int activation, const std::string& tactic1,
             const std::string& tactic2, bool has_fc1_bias) {
            return r.workspace_size(make_problem(num_tokens, hidden_size, inter_size,
                                                 num_experts, top_k, 0, activation),
                                    tactic1, tactic2, has_fc1_bias);
          },
          py::arg("num_tokens"), py::arg("hidden_size"), py::arg("inter_size"),
          py::arg("num_experts"), py::arg("top_k"), py::arg("activation"),
          py::arg("tactic1") = "", py::arg("tactic2") = "", py::arg("has_fc1_bias") = false,
          "Workspace bytes run_moe needs with these tactics (\"\": any) and fc1 bias presence.")
      .def(
          "run_moe",
          [](const MoeRunner& r, int64_t num_tokens, int64_t hidden_size, int64_t inter_size,
             int num_experts, int top_k, int expert_start, int activation, std::uintptr_t input,
             std::uintptr_t token_selected_experts, std::uintptr_t token_final_scales,
             std::uintptr_t fc1_weights, std::uintptr_t fc2_weights, std::uintptr_t fc1_bias,
             std::uintptr_t fc2_bias, std::uintptr_t swiglu_alpha, std::uintptr_t swiglu_beta,
             std::uintptr_t swiglu_limit, std::uintptr_t output, std::uintptr_t workspace,
             size_t workspace_bytes, const std::string& tactic1, const std::string& tactic2,
             std::uintptr_t stream, std::uintptr_t fc1_scales, std::uintptr_t fc2_scales,
             bool enable_pdl, std::uintptr_t situ_beta, std::uintptr_t situ_linear_beta,
             std::uintptr_t clamped_relu2_limit, std::uintptr_t fc1_zeros,
             std::uintptr_t fc2_zeros, int64_t fc1_group_size, int64_t fc2_group_size) {
            MoePointers p;
            p.input = as_ptr<const void>(input);
            p.token_selected_experts = as_ptr<const int32_t>(token_selected_experts);
            p.token_final_scales = as_ptr<const float>(token_final_scales);
            p.fc1_weights = as_ptr<const void>(fc1_weights);
            p.fc2_weights = as_ptr<const void>(fc2_weights);
            p.fc1_bias = as_ptr<const void>(fc1_bias);
            p.fc2_bias = as_ptr<const void>(fc2_bias);
            p.swiglu_alpha = as_ptr<const float>(swiglu_alpha);
            p.swiglu_beta = as_ptr<const float>(swiglu_beta);
            p.swiglu_limit = as_ptr<const float>(swiglu_limit);
            p.situ_beta = as_ptr<const float>(situ_beta);
            p.situ_linear_beta = as_ptr<const float>(situ_linear_beta);
            p.clamped_relu2_limit = as_ptr<const float>(clamped_relu2_limit);
            p.fc1_scales = as_ptr<const void>(fc1_scales);
            p.fc2_scales = as_ptr<const void>(fc2_scales);
            p.fc1_zeros = as_ptr<const void>(fc1_zeros);
            p.fc2_zeros = as_ptr<const void>(fc2_zeros);
            p.output = as_ptr<void>(output);
            p.workspace = as_ptr<void>(workspace);
            p.workspace_bytes = workspace_bytes;
            MoeProblem problem = make_problem(num_tokens, hidden_size, inter_size, num_experts,
                                              top_k, expert_start, activation);
            problem.fc1_group_size = fc1_group_size;
            problem.fc2_group_size = fc2_group_size;
            r.run_moe(problem, p, tactic1, tactic2, as_ptr<CUstream_st>(stream), enable_pdl);
          },
          py::arg("num_tokens"), py::arg("hidden_size"), py::arg("inter_size"),
          py::arg("num_experts"), py::arg("top_k"), py::arg("expert_start"),
          py::arg("activation"), py::arg("input"), py::arg("token_selected_experts"),
          py::arg("token_final_scales"), py::arg("fc1_weights"), py::arg("fc2_weights"),
          py::arg("fc1_bias"), py::arg("fc2_bias"), py::arg("swiglu_alpha"),
          py::arg("swiglu_beta"), py::arg("swiglu_limit"), py::arg("output"),
          py::arg("workspace"), py::arg("workspace_bytes"), py::arg("tactic1"),
          py::arg("tactic2"), py::arg("stream"), py::arg("fc1_scales") = 0,
          py::arg("fc2_scales") = 0, py::arg("enable_pdl") = true, py::arg("situ_beta") = 0,
          py::arg("situ_linear_beta") = 0, py::arg("clamped_relu2_limit") = 0,
          py::arg("fc1_zeros") = 0, py::arg("fc2_zeros") = 0, py::arg("fc1_group_size") = 0,
          py::arg("fc2_group_size") = 0, py::call_guard<py::gil_scoped_release>())
      .def(
          "prepare_gemm_profile",
          [](const MoeRunner& r, int gemm, int64_t num_tokens, int64_t hidden_size,
             int64_t inter_size, int num_experts, int top_k, int activation,
             std::uintptr_t weights, std::uintptr_t workspace, size_t workspace_bytes,
             uint64_t seed, std::uintptr_t stream, std::uintptr_t scales, std::uintptr_t zeros,
             int64_t group_size) {
            MoeProblem problem = make_problem(num_tokens, hidden_size, inter_size, num_experts,
                                              top_k, 0, activation);
            (gemm == 1 ? problem.fc1_group_size : problem.fc2_group_size) = group_size;
            r.prepare_gemm_profile(gemm, problem, as_ptr<const void>(weights),
                                   as_ptr<const void>(scales), as_ptr<const void>(zeros),
                                   as_ptr<void>(workspace), workspace_bytes, seed,
                                   as_ptr<CUstream_st>(stream));
          },
          py::arg("gemm"), py::arg("num_tokens"), py::arg("hidden_size"), py::arg("inter_size"),
          py::arg("num_experts"), py::arg("top_k"), py::arg("activation"), py::arg("weights"),
          py::arg("workspace"), py::arg("workspace_bytes"), py::arg("seed"), py::arg("stream"),
          py::arg("scales") = 0, py::arg("zeros") = 0, py::arg("group_size") = 0,
          py::call_guard<py::gil_scoped_release>())
      .def(
          "run_gemm_profile",
          [](const MoeRunner& r, int gemm, const std::string& tactic, int64_t num_tokens,
             int64_t hidden_size, int64_t inter_size, int num_experts, int top_k, int activation,
             std::uintptr_t workspace, size_t workspace_bytes, std::uintptr_t stream,
             int64_t group_size) {
            MoeProblem problem = make_problem(num_tokens, hidden_size, inter_size, num_experts,
                                              top_k, 0, activation);
            (gemm == 1 ? problem.fc1_group_size : problem.fc2_group_size) = group_size;
            r.run_gemm_profile(gemm, tactic, problem, as_ptr<void>(workspace), workspace_bytes,
                               as_ptr<CUstream_st>(stream));
          },
          py::arg("gemm"), py::arg("tactic"), py::arg("num_tokens"), py::arg("hidden_size"),
          py::arg("inter_size"), py::arg("num_experts"), py::arg("top_k"),
          py::arg("activation"), py::arg("workspace"), py::arg("workspace_bytes"),
          py::arg("stream"), py::arg("group_size") = 0, py::call_guard<py::gil_scoped_release>());
}
