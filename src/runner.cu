// MoeRunner: workspace layout, tactic lookup and the launch sequence of one MoE call.
//
//   routing (+ grouped-GEMM arguments) -> gather -> GEMM1 -> activation -> GEMM2 -> finalize
//
// or, with a fused gated GEMM1 tactic (gather, GEMM1 and the gated activation in one kernel):
//
//   routing (+ grouped-GEMM arguments) -> gated GEMM1 -> GEMM2 -> finalize
//
// Every launch's grid depends only on host-known sizes; rows per expert exist only on the device,
// where the routing kernel that computes the per-expert offsets also writes the grouped GEMMs'
// problem sizes and pointers. No host sync. A GEMM2 tactic split over K (decode) writes fp32
// partial sums that finalize adds up in a fixed order. On sm_90+ the kernels are launched as
// programmatic dependents of one another (src/launch.cuh), which hides most launch latency.
#include "cutlass_moe/runner.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cutlass/gemm_coord.h"
#include "cutlass_moe/activation.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/finalize.h"
#include "cutlass_moe/routing.h"
#include "gemm_args.cuh"
#include "launch.cuh"

namespace cutlass_moe {
namespace {

constexpr size_t kWorkspaceAlignment = 256;

size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// Byte offsets of one grouped GEMM's device-resident arguments inside the workspace.
struct GemmArgsLayout {
  size_t problem_sizes, ptr_a, ptr_b, ptr_d, lda, ldb, ldd, ptr_scale, ptr_zero, ptr_rows;
};

// Indices of the argument sets in WorkspaceLayout::gemm: GEMM1 as a plain GEMM (A = gathered
// rows, D = [T*k, N1]), GEMM2, GEMM1 as a fused gated GEMM (A = tokens through row indices,
// D = [T*k, I]), then GEMM2 split over K, one set per split factor (E * splits problems).
// Routing writes the three unsplit sets on every call (the unused ones are small), and the split
// set of the call's GEMM2 tactic when it has one.
constexpr int kArgsGemm1 = 0;
constexpr int kArgsGemm2 = 1;
constexpr int kArgsGemm1Gated = 2;
constexpr int kSplitFactors[] = {2, 4, 8};
constexpr int kNumSplitFactors = 3;
constexpr int kArgsSets = 3 + kNumSplitFactors;

// GEMM2 may be split over K only for decode-sized calls (kSplitKMaxRows): its fp32 partial sums
// take splits * T*k * H * 4 bytes of workspace.
bool split_k_allowed(const MoeProblem& p) { return p.expanded_rows() <= kSplitKMaxRows; }

// Position of `splits` in kSplitFactors.
int split_factor_index(int splits) {
  for (int i = 0; i < kNumSplitFactors; ++i) {
    if (kSplitFactors[i] == splits) return i;
  }
  throw std::logic_error("no argument set for a GEMM2 split into " + std::to_string(splits));
}

// The argument set of a GEMM2 split into `splits` (one of kSplitFactors).
int split_args_index(int splits) { return 3 + split_factor_index(splits); }

// The elementwise stage runs after a plain GEMM1 unless it would copy GEMM1's output unchanged
// (Identity without fc1 bias: GEMM2 then reads GEMM1's output); a fused gated GEMM1 applies it.
bool activation_stage_runs(const MoeProblem& p, bool fused_gemm1, bool has_fc1_bias) {
  return !fused_gemm1 && (p.activation != Activation::kIdentity || has_fc1_bias);
}

// Kernel workspace (GroupedGemmArgs::kernel_workspace) of tactic t for the most persistent CTAs
// it may launch; null t: the most any compiled tactic needs. 0 for the tactics without any (every
// tactic of a build without sm90 tactics).
size_t kernel_workspace_for(const GemmTactic* t) {
  if (t != nullptr) {
    return t->workspace_bytes != nullptr ? t->workspace_bytes(kMaxPersistentCtas) : 0;
  }
  static const size_t most = [] {
    int count = 0;
    const GemmTactic* const* all = gemm_tactics(&count);
    size_t bytes = 0;
    for (int i = 0; i < count; ++i) bytes = std::max(bytes, kernel_workspace_for(all[i]));
    return bytes;
  }();
  return most;
}

// Which workspace buffers a call's tactics use. Default-constructed: every buffer, which serves
// any tactic (profiling, and workspace_size without tactic names).
struct WorkspacePlan {
  bool gathered = true;  // [T*k, H]: a plain GEMM1's A, then an unsplit GEMM2's output
  bool fc1_out = true;   // [T*k, N1]: a plain GEMM1's output
  bool act_out = true;   // [T*k, I]: the activation stage's or a fused gated GEMM1's output
  // Bit i: GEMM2 may be split into kSplitFactors[i]; its argument set, and fp32 partial sums
  // for the largest such split (both only where split_k_allowed).
  unsigned split_sets = (1u << kNumSplitFactors) - 1;
  // Scratch of the GEMM kernels that keep per-CTA state in device memory (sm90 tactics). GEMM1
  // and GEMM2 share it: GEMM2 starts after GEMM1 has completed (stream order, or PDL's wait).
  size_t kernel_workspace = kernel_workspace_for(nullptr);
};

// The plan of a call with GEMM1 tactic t1 and GEMM2 tactic t2 (null: any tactic of that GEMM).
// A plain GEMM1 reads the gathered rows and writes [T*k, N1], then the activation stage (when it
// runs) writes [T*k, I]; a fused gated GEMM1 reads the token rows and writes [T*k, I] directly.
// GEMM2 writes [T*k, H], or fp32 partial sums when split over K.
WorkspacePlan plan_for(const MoeProblem& p, const GemmTactic* t1, const GemmTactic* t2,
                       bool has_fc1_bias) {
  WorkspacePlan plan;
  const bool plain_gemm1 = t1 == nullptr || !t1->gated;
  const bool unsplit_gemm2 = t2 == nullptr || t2->split_k == 1;
  if (t1 != nullptr) {
    plan.fc1_out = plain_gemm1;
    plan.act_out = t1->gated || activation_stage_runs(p, false, has_fc1_bias);
  }
  if (t2 != nullptr) {
    plan.split_sets = t2->split_k > 1 ? 1u << split_factor_index(t2->split_k) : 0u;
  }
  plan.gathered = plain_gemm1 || unsplit_gemm2;
  plan.kernel_workspace = std::max(kernel_workspace_for(t1), kernel_workspace_for(t2));
  return plan;
}

// Where everything lives in the caller's workspace. A pure function of the problem's shapes and
// the plan, so that workspace_size and run_moe agree.
struct WorkspaceLayout {
  size_t expert_first_token_offset = 0;
  size_t permuted_to_source = 0;
  size_t source_to_permuted = 0;
  size_t permuted_expert = 0;
  size_t permuted_token = 0;  // [T*k] int32: token row of each permuted row
  size_t expert_counts = 0;  // [E] int32, used by synthetic (profiling) routing
  size_t routing_scratch = 0;
  size_t routing_scratch_bytes = 0;
  GemmArgsLayout gemm[kArgsSets] = {};
  // Buffers the plan leaves out take no bytes (their offset is where they would start).
  size_t gathered = 0;  // [T*k, H]: GEMM1's A; reused as GEMM2's output once GEMM1 is done
  size_t fc1_out = 0;   // [T*k, N1]
  size_t act_out = 0;   // [T*k, I]
  size_t fc2_partials = 0;  // fp32 [splits, T*k, H] for the plan's largest split, if any
  // Last, so that the other buffers keep their offsets: GroupedGemmArgs::kernel_workspace.
  size_t kernel_workspace = 0;
  size_t kernel_workspace_bytes = 0;
  size_t total = 0;

  static WorkspaceLayout make(const MoeProblem& p, size_t elem_bytes, const WorkspacePlan& plan) {
    WorkspaceLayout w;
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
      size_t at = cursor;
      cursor += align_up(bytes);
      return at;
    };
    const size_t rows = static_cast<size_t>(p.expanded_rows());
    const size_t experts = static_cast<size_t>(p.num_experts);
    w.expert_first_token_offset = take((experts + 1) * sizeof(int64_t));
    w.permuted_to_source = take(rows * sizeof(int32_t));
    w.source_to_permuted = take(rows * sizeof(int32_t));
    w.permuted_expert = take(rows * sizeof(int32_t));
    w.permuted_token = take(rows * sizeof(int32_t));
    w.expert_counts = take(experts * sizeof(int32_t));
    w.routing_scratch_bytes = routing_scratch_size(p.expanded_rows(), p.num_experts);
    w.routing_scratch = take(w.routing_scratch_bytes);
    const bool split_k = split_k_allowed(p);
    int max_splits = 1;
    for (int set = 0; set < kArgsSets; ++set) {
      // Split sets hold E * splits problems, and exist only where the plan's split may run.
      const bool split_set = set >= 3 && split_k && ((plan.split_sets >> (set - 3)) & 1u);
      if (split_set) max_splits = std::max(max_splits, kSplitFactors[set - 3]);
      const size_t problems =
          set < 3 ? experts : (split_set ? experts * kSplitFactors[set - 3] : 0);
      GemmArgsLayout& g = w.gemm[set];
      g.problem_sizes = take(problems * sizeof(cutlass::gemm::GemmCoord));
      g.ptr_a = take(problems * sizeof(void*));
      g.ptr_b = take(problems * sizeof(void*));
      g.ptr_d = take(problems * sizeof(void*));
      g.lda = take(problems * sizeof(int64_t));
      g.ldb = take(problems * sizeof(int64_t));
      g.ldd = take(problems * sizeof(int64_t));
      g.ptr_scale = take(problems * sizeof(void*));
      g.ptr_zero = take(problems * sizeof(void*));
      g.ptr_rows = take(problems * sizeof(int32_t*));
    }
    const size_t hidden = static_cast<size_t>(p.hidden_size);
    w.gathered = take(plan.gathered ? rows * hidden * elem_bytes : 0);
    w.fc1_out = take(plan.fc1_out ? rows * static_cast<size_t>(p.fc1_out_size()) * elem_bytes : 0);
    w.act_out = take(plan.act_out ? rows * static_cast<size_t>(p.inter_size) * elem_bytes : 0);
    w.fc2_partials =
        take(max_splits > 1 ? static_cast<size_t>(max_splits) * rows * hidden * sizeof(float) : 0);
    w.kernel_workspace_bytes = plan.kernel_workspace;
    w.kernel_workspace = take(plan.kernel_workspace);
    w.total = cursor;
    return w;
  }

  GemmArgsDevice gemm_device(int index, char* base) const {
    const GemmArgsLayout& g = gemm[index];
    return {reinterpret_cast<cutlass::gemm::GemmCoord*>(base + g.problem_sizes),
            reinterpret_cast<void**>(base + g.ptr_a),
            reinterpret_cast<void**>(base + g.ptr_b),
            reinterpret_cast<void**>(base + g.ptr_d),
            reinterpret_cast<int64_t*>(base + g.lda),
            reinterpret_cast<int64_t*>(base + g.ldb),
            reinterpret_cast<int64_t*>(base + g.ldd),
            reinterpret_cast<void**>(base + g.ptr_scale),
            reinterpret_cast<void**>(base + g.ptr_zero),
            reinterpret_cast<int32_t**>(base + g.ptr_rows)};
  }

  // What routing (or the profiling set-up) needs to write every argument set, plus the split-K
  // set of a GEMM2 split into `gemm2_splits` (1: none).
  GemmArgsWriter writer(const MoeProblem& p, char* base, const GemmOperands& ops,
                        DType act_dtype, DType weight_dtype, int gemm2_splits) const {
    GemmArgsWriter w;
    w.num_experts = p.num_experts;
    w.hidden = p.hidden_size;
    w.fc1_cols = p.fc1_out_size();
    w.inter = p.inter_size;
    w.elem_bytes = static_cast<int>(dtype_size(act_dtype));
    w.scale_bytes = static_cast<int>(scale_size(weight_dtype, act_dtype));
    w.weight_bits = static_cast<int>(dtype_bits(weight_dtype));
    // Scale rows per expert: one per K-group for group-scaled weights, one (per channel)
    // otherwise.
    w.fc1_scale_rows = p.fc1_group_size > 0 ? p.hidden_size / p.fc1_group_size : 1;
    w.fc2_scale_rows = p.fc2_group_size > 0 ? p.inter_size / p.fc2_group_size : 1;
    w.ops = ops;
    w.gemm1 = gemm_device(kArgsGemm1, base);
    w.gemm2 = gemm_device(kArgsGemm2, base);
    w.gemm1_gated = gemm_device(kArgsGemm1Gated, base);
    w.gemm2_splits = gemm2_splits;
    w.gemm2_split = gemm2_splits > 1 ? gemm_device(split_args_index(gemm2_splits), base)
                                     : GemmArgsDevice{};
    w.partial_rows = p.expanded_rows();
    return w;
  }

  GroupedGemmArgs gemm_args(int index, char* base, int problem_count) const {
    GemmArgsDevice d = gemm_device(index, base);
    GroupedGemmArgs a;
    a.problem_count = problem_count;
    a.problem_sizes = d.problem_sizes;
    a.ptr_a = d.ptr_a;
    a.ptr_b = d.ptr_b;
    a.ptr_d = d.ptr_d;
    a.lda = d.lda;
    a.ldb = d.ldb;
    a.ldd = d.ldd;
    a.ptr_scale = d.ptr_scale;
    a.ptr_zero = d.ptr_zero;
    a.ptr_rows = d.ptr_rows;
    a.kernel_workspace = kernel_workspace_bytes > 0 ? base + kernel_workspace : nullptr;
    a.kernel_workspace_bytes = kernel_workspace_bytes;
    return a;
  }
};

// Writes every argument set of expert e = thread from the routed offsets (profiling set-up;
// a real call has routing write them).
__global__ void write_gemm_args_kernel(const int64_t* __restrict__ expert_first_token_offset,
                                       GemmArgsWriter writer) {
  wait_on_dependencies();
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= writer.num_experts) return;
  const int64_t first_row = expert_first_token_offset[e];
  writer.write(e, first_row, static_cast<int>(expert_first_token_offset[e + 1] - first_row));
}

// A 64-bit mix (splitmix64's finaliser) folded to 32 bits: cheap, well-spread pseudo-randomness.
__host__ __device__ uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Synthetic routing for profiling: seed 0 spreads rows evenly over experts; any other seed draws
// each row's expert uniformly. Permuted row r reads token row r (the gathered buffer stands in
// for the token matrix). One block: profiling shapes are small enough.
__global__ void synthetic_offsets_kernel(int64_t rows, int num_experts, uint64_t seed,
                                         int* __restrict__ counts,
                                         int64_t* __restrict__ expert_first_token_offset,
                                         int32_t* __restrict__ permuted_token) {
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    permuted_token[r] = static_cast<int32_t>(r);
  }
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  if (seed == 0) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      counts[e] = static_cast<int>(rows / num_experts + (e < rows % num_experts ? 1 : 0));
    }
  } else {
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
      atomicAdd(&counts[hash_u32(seed * 0x9e3779b97f4a7c15ULL + r) % num_experts], 1);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int e = 0; e < num_experts; ++e) {
      expert_first_token_offset[e] = total;
      total += counts[e];
    }
    expert_first_token_offset[num_experts] = total;
  }
}

// Fills a 16-bit buffer with values uniform in [-1, 1) (never zeros: they time faster).
template <typename Element>
__global__ void fill_random_kernel(Element* __restrict__ data, int64_t count, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = (hash_u32(seed ^ (i * 0x9e3779b97f4a7c15ULL)) >> 8) * (1.0f / 16777216.0f);
    data[i] = Element(2.0f * u - 1.0f);
  }
}

// Shared-memory, occupancy and SM count of one device, computed once per device.
struct DeviceState {
  int sm_count = 0;
  int cc = 0;  // compute capability, 10 * major + minor
  std::vector<int> blocks_per_sm;  // per entry of MoeRunner::Impl::tactics
  // Programmatic dependent launch is safe: an sm_90+ GPU running code compiled for sm_90+ (so
  // the kernels carry their griddepcontrol.wait; code JIT-compiled from older PTX does not).
  bool pdl = false;
};

bool device_supports_pdl(int device) {
  int major = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return false;
  cudaFuncAttributes attributes = {};
  CUTLASS_MOE_CHECK_CUDA(cudaFuncGetAttributes(&attributes, write_gemm_args_kernel));
  return attributes.ptxVersion >= 90;
}

int current_device() {
  int device = 0;
  CUTLASS_MOE_CHECK_CUDA(cudaGetDevice(&device));
  return device;
}

std::string tactic_names(const std::vector<const GemmTactic*>& tactics) {
  std::string out;
  for (size_t i = 0; i < tactics.size(); ++i) {
    if (i) out += ", ";
    out += tactics[i]->name;
  }
  return out;
}

}  // namespace

struct MoeRunner::Impl {
  std::vector<const GemmTactic*> tactics;  // compiled for this runner's dtypes
  mutable std::mutex mutex;
  mutable std::map<int, DeviceState> devices;

  const DeviceState& device_state() const {
    const int device = current_device();
    std::lock_guard<std::mutex> lock(mutex);
    auto found = devices.find(device);
    if (found != devices.end()) return found->second;
    DeviceState state;
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&state.sm_count, cudaDevAttrMultiProcessorCount, device));
    int major = 0, minor = 0;
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    state.cc = 10 * major + minor;
    // Arch-specific tactics (sm_90a) have no code for other GPUs: never prepared there.
    for (const GemmTactic* t : tactics) {
      const bool arch_ok = t->required_cc == 0 || t->required_cc == state.cc;
      state.blocks_per_sm.push_back(arch_ok ? t->prepare() : 0);
    }
    state.pdl = device_supports_pdl(device);
    return devices.emplace(device, std::move(state)).first->second;
  }

  // The tactic named `name`, checked to exist for this configuration and to serve GEMM `gemm`
  // (no device needed). Returns its index in `tactics`.
  size_t lookup(const std::string& name, int gemm) const {
    for (size_t i = 0; i < tactics.size(); ++i) {
      if (name != tactics[i]->name) continue;
      if (!(tactics[i]->gemms & (1 << (gemm - 1)))) {
        throw InvalidArgument("tactic '" + name + "' cannot serve GEMM" + std::to_string(gemm));
      }
      return i;
    }
    throw InvalidArgument("unknown tactic '" + name + "' for GEMM" + std::to_string(gemm) +
                          "; compiled tactics: " + tactic_names(tactics));
  }

  // As lookup, and checked to run on the current device.
  size_t find(const std::string& name, int gemm, const DeviceState& state) const {
    const size_t i = lookup(name, gemm);
    const int cc = tactics[i]->required_cc;
    if (cc != 0 && cc != state.cc) {
      throw InvalidArgument("tactic '" + name + "' is sm_" + std::to_string(cc) +
                            "a code for compute capability " + std::to_string(cc / 10) + "." +
                            std::to_string(cc % 10) + " GPUs only; this GPU is " +
                            std::to_string(state.cc / 10) + "." + std::to_string(state.cc % 10));
    }
    if (state.blocks_per_sm[i] <= 0) {
      throw InvalidArgument("tactic '" + name + "' needs " +
                            std::to_string(tactics[i]->smem_bytes) +
                            " bytes of shared memory per block, more than this GPU allows");
    }
    return i;
  }

  bool gated(size_t index) const { return tactics[index]->gated; }

  // A fused gated GEMM1 computes the gated activation of [up | gate] itself: only gated
  // activations (is_gated) qualify.
  void check_gated_activation(size_t index, Activation activation) const {
    if (gated(index) && !is_gated(activation)) {
      throw InvalidArgument("tactic '" + std::string(tactics[index]->name) +
                            "' fuses a gated activation into GEMM1; activation " +
                            activation_name(activation) + " (" +
                            std::to_string(static_cast<int>(activation)) + ") is not gated");
    }
  }

  // Persistent blocks for one grouped GEMM: a full wave, but no more than the tiles that can
  // exist (each non-empty expert adds at most one partial row tile, and a GEMM split over K has
  // each tile once per split), since idle blocks still walk the problem list.
  int threadblock_count(size_t index, const DeviceState& state, int64_t rows, int num_experts,
                        int64_t n) const {
    const GemmTactic* t = tactics[index];
    const int64_t wave = static_cast<int64_t>(state.sm_count) * state.blocks_per_sm[index];
    const int64_t row_tiles = (rows + t->tile_m - 1) / t->tile_m + std::min<int64_t>(num_experts, rows);
    const int64_t col_tiles = (n + t->tile_n - 1) / t->tile_n;
    const int64_t tiles = row_tiles * col_tiles * t->split_k;
    return static_cast<int>(std::max<int64_t>(1, std::min(wave, tiles)));
  }

  int split_k(size_t index) const { return tactics[index]->split_k; }

  // A GEMM2 split over K needs the call's expanded rows within the partial-sum buffer.
  void check_split_k(size_t index, const MoeProblem& p) const {
    if (split_k(index) > 1 && !split_k_allowed(p)) {
      throw InvalidArgument("tactic '" + std::string(tactics[index]->name) +
                            "' splits GEMM2 over K, which runs only up to " +
                            std::to_string(kSplitKMaxRows) + " expanded rows (T*k); this call has " +
                            std::to_string(p.expanded_rows()));
    }
  }

  // Adds the GEMM and tactic to a launch failure, keeping bad arguments InvalidArgument (Python
  // ValueError) and everything else std::runtime_error.
  void launch(size_t index, int gemm, const GroupedGemmArgs& args, int threadblocks,
              cudaStream_t stream) const {
    const auto context = [&] {
      return std::string("GEMM") + std::to_string(gemm) + " with tactic '" +
             tactics[index]->name + "' failed: ";
    };
    try {
      tactics[index]->launch(args, threadblocks, stream);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(context() + e.what());
    } catch (const std::exception& e) {
      throw std::runtime_error(context() + e.what());
    }
  }
};

MoeRunner::MoeRunner(DType act_dtype, DType weight_dtype, DType out_dtype)
    : act_dtype_(act_dtype), weight_dtype_(weight_dtype), out_dtype_(out_dtype),
      impl_(new Impl) {
  const bool act_ok = act_dtype == DType::kFloat16 || act_dtype == DType::kBFloat16;
  const bool weight_ok =
      weight_dtype == act_dtype || weight_dtype == DType::kInt8 || is_group_scaled(weight_dtype);
  const bool out_ok = out_dtype == act_dtype || out_dtype == DType::kFloat32;
  if (!act_ok || !weight_ok || !out_ok) {
    throw InvalidArgument(std::string("unsupported dtype configuration (activation ") +
                          dtype_name(act_dtype) + ", weights " + dtype_name(weight_dtype) +
                          ", output " + dtype_name(out_dtype) +
                          "): supported are fp16 or bf16 activations with weights of the same "
                          "dtype, int8 (per-channel scales) or int4, fp8 or mxfp4 (group-wise "
                          "scales), and output in the activation dtype or fp32");
  }
  int count = 0;
  const GemmTactic* const* all = gemm_tactics(&count);
  for (int i = 0; i < count; ++i) {
    if (all[i]->act_dtype == act_dtype && all[i]->weight_dtype == weight_dtype) {
      impl_->tactics.push_back(all[i]);
    }
  }
}

MoeRunner::~MoeRunner() = default;

std::vector<TacticDescriptor> MoeRunner::tactics(int gemm, bool runnable_only) const {
  if (gemm != 1 && gemm != 2) throw InvalidArgument("gemm must be 1 or 2");
  std::vector<TacticDescriptor> out;
  // Without a device, every compiled tactic is listed as not runnable.
  int device_count = 0;
  const bool have_device = cudaGetDeviceCount(&device_count) == cudaSuccess && device_count > 0;
  if (!have_device) (void)cudaGetLastError();
  const DeviceState* state = have_device ? &impl_->device_state() : nullptr;
  for (size_t i = 0; i < impl_->tactics.size(); ++i) {
    const GemmTactic* t = impl_->tactics[i];
    if (!(t->gemms & (1 << (gemm - 1)))) continue;
    TacticDescriptor d;
    d.name = t->name;
    d.act_dtype = t->act_dtype;
    d.weight_dtype = t->weight_dtype;
    d.tile_m = t->tile_m;
    d.tile_n = t->tile_n;
    d.tile_k = t->tile_k;
    d.warp_m = t->warp_m;
    d.warp_n = t->warp_n;
    d.warp_k = t->warp_k;
    d.stages = t->stages;
    d.threads = t->threads;
    d.smem_bytes = t->smem_bytes;
    d.gemms = t->gemms;
    d.gated = t->gated;
    d.split_k = t->split_k;
    d.decode = t->decode;
    d.required_cc = t->required_cc;
    d.runnable = state != nullptr && state->blocks_per_sm[i] > 0;
    if (runnable_only && !d.runnable) continue;
    out.push_back(d);
  }
  return out;
}

namespace {

// Messages are built without iostreams (see throw_cuda_error in cuda_check.h).
void check_problem(const MoeProblem& p, DType weight_dtype) {
  using std::to_string;
  std::string err;
  if (p.num_tokens < 0) err += "num_tokens must be >= 0 (got " + to_string(p.num_tokens) + "); ";
  if (p.hidden_size < 8 || p.hidden_size % 8 != 0) {
    err += "hidden_size must be a positive multiple of 8 (got " + to_string(p.hidden_size) + "); ";
  }
  if (p.inter_size < 8 || p.inter_size % 8 != 0) {
    err += "inter_size must be a positive multiple of 8 (got " + to_string(p.inter_size) + "); ";
  }
  // Mixed-input (int8) tactics read K in steps of 16 elements: both GEMMs' K must follow.
  if (weight_dtype == DType::kInt8 && (p.hidden_size % 16 != 0 || p.inter_size % 16 != 0)) {
    err += "int8 weights need hidden_size and inter_size to be multiples of 16 (got " +
           to_string(p.hidden_size) + " and " + to_string(p.inter_size) + "); ";
  }
  // Group-scaled tactics read K in halves of 32 with one scale row each.
  if (is_group_scaled(weight_dtype) && (p.hidden_size % 32 != 0 || p.inter_size % 32 != 0)) {
    err += std::string(dtype_name(weight_dtype)) +
           " weights need hidden_size and inter_size to be multiples of 32 (got " +
           to_string(p.hidden_size) + " and " + to_string(p.inter_size) + "); ";
  }
  if (p.num_experts < 1) err += "num_experts must be >= 1 (got " + to_string(p.num_experts) + "); ";
  if (p.top_k < 1) err += "top_k must be >= 1 (got " + to_string(p.top_k) + "); ";
  if (p.expert_start < 0) {
    err += "expert_start must be >= 0 (got " + to_string(p.expert_start) + "); ";
  }
  const int act = static_cast<int>(p.activation);
  if (!is_valid_activation(act)) err += "unknown activation " + to_string(act) + "; ";
  // GEMM sizes are 32-bit in CUTLASS's GemmCoord.
  constexpr int64_t kMaxDim = (int64_t(1) << 31) - 1;
  if (p.expanded_rows() > kMaxDim || p.fc1_out_size() > kMaxDim) {
    err += "num_tokens * top_k and 2 * inter_size must stay below 2^31; ";
  }
  if (!err.empty()) throw InvalidArgument(err.substr(0, err.size() - 2));
}

// Group-scaled weights: each GEMM's K-group (a multiple of 32 that divides its K; K itself is
// per-channel; mxfp4: 32). Other weights take no group size. `gemms`: bit 0 GEMM1, bit 1 GEMM2.
void check_group_sizes(const MoeProblem& p, DType weight_dtype, int gemms) {
  using std::to_string;
  const int64_t groups[2] = {p.fc1_group_size, p.fc2_group_size};
  const int64_t ks[2] = {p.hidden_size, p.inter_size};
  for (int g = 0; g < 2; ++g) {
    if (!(gemms & (1 << g))) continue;
    const std::string which = "fc" + to_string(g + 1) + "_group_size";
    if (!is_group_scaled(weight_dtype)) {
      if (groups[g] != 0) {
        throw InvalidArgument(which + " applies to group-scaled weights only (got " +
                              to_string(groups[g]) + " with " + dtype_name(weight_dtype) + ")");
      }
      continue;
    }
    if (weight_dtype == DType::kMxfp4 && groups[g] != 32) {
      throw InvalidArgument(which + " must be 32 for mxfp4 weights (got " +
                            to_string(groups[g]) + ")");
    }
    if (groups[g] <= 0 || groups[g] % 32 != 0 || ks[g] % groups[g] != 0) {
      throw InvalidArgument(which + " must be a positive multiple of 32 that divides K = " +
                            to_string(ks[g]) + " (got " + to_string(groups[g]) + ")");
    }
  }
}

}  // namespace

bool MoeRunner::pdl_supported() const { return impl_->device_state().pdl; }

size_t MoeRunner::workspace_size(const MoeProblem& problem, const std::string& tactic1,
                                 const std::string& tactic2, bool has_fc1_bias) const {
  check_problem(problem, weight_dtype_);
  // Named tactics are checked as run_moe checks them, bar the device (this needs none).
  const GemmTactic* t1 = nullptr;
  const GemmTactic* t2 = nullptr;
  if (!tactic1.empty()) {
    const size_t index = impl_->lookup(tactic1, 1);
    impl_->check_gated_activation(index, problem.activation);
    t1 = impl_->tactics[index];
  }
  if (!tactic2.empty()) {
    const size_t index = impl_->lookup(tactic2, 2);
    impl_->check_split_k(index, problem);
    t2 = impl_->tactics[index];
  }
  return WorkspaceLayout::make(problem, dtype_size(act_dtype_),
                               plan_for(problem, t1, t2, has_fc1_bias))
      .total;
}

void MoeRunner::run_moe(const MoeProblem& p, const MoePointers& ptrs, const std::string& tactic1,
                        const std::string& tactic2, cudaStream_t stream, bool enable_pdl) const {
  check_problem(p, weight_dtype_);
  const DeviceState& state = impl_->device_state();
  const size_t t1 = impl_->find(tactic1, 1, state);
  const size_t t2 = impl_->find(tactic2, 2, state);
  impl_->check_gated_activation(t1, p.activation);
  impl_->check_split_k(t2, p);
  const WorkspaceLayout layout =
      WorkspaceLayout::make(p, dtype_size(act_dtype_),
                            plan_for(p, impl_->tactics[t1], impl_->tactics[t2],
                                     ptrs.fc1_bias != nullptr));
  if (p.num_tokens == 0) return;

  if (!ptrs.input || !ptrs.token_selected_experts || !ptrs.token_final_scales ||
      !ptrs.fc1_weights || !ptrs.fc2_weights || !ptrs.output || !ptrs.workspace) {
    throw InvalidArgument(
        "input, token_selected_experts, token_final_scales, fc1/fc2 weights, output and "
        "workspace must be non-null");
  }
  if (ptrs.workspace_bytes < layout.total) {
    throw InvalidArgument("workspace has " + std::to_string(ptrs.workspace_bytes) +
                          " bytes, the call needs " + std::to_string(layout.total) +
                          " (tactics '" + tactic1 + "' and '" + tactic2 + "')");
  }
  if (weight_dtype_ == DType::kInt8 && (!ptrs.fc1_scales || !ptrs.fc2_scales)) {
    throw InvalidArgument("int8 weights need fc1 and fc2 per-channel scales");
  }
  check_group_sizes(p, weight_dtype_, 3);
  if (is_group_scaled(weight_dtype_) && (!ptrs.fc1_scales || !ptrs.fc2_scales)) {
    throw InvalidArgument(std::string(dtype_name(weight_dtype_)) +
                          " weights need fc1 and fc2 group-wise scales");
  }
  if ((ptrs.fc1_zeros || ptrs.fc2_zeros) &&
      (weight_dtype_ != DType::kInt4 || !ptrs.fc1_zeros || !ptrs.fc2_zeros)) {
    throw InvalidArgument("zero points are for int4 weights only, and for both GEMMs or neither");
  }
  if (p.activation == Activation::kClampedRelu2 && !ptrs.clamped_relu2_limit) {
    throw InvalidArgument("ClampedRelu2 needs clamped_relu2_limit (one float32 on the device)");
  }

  const bool pdl = enable_pdl && state.pdl;
  char* base = static_cast<char*>(ptrs.workspace);
  auto* offsets = reinterpret_cast<int64_t*>(base + layout.expert_first_token_offset);
  auto* permuted_to_source = reinterpret_cast<int32_t*>(base + layout.permuted_to_source);
  auto* source_to_permuted = reinterpret_cast<int32_t*>(base + layout.source_to_permuted);
  auto* permuted_expert = reinterpret_cast<int32_t*>(base + layout.permuted_expert);
  auto* permuted_token = reinterpret_cast<int32_t*>(base + layout.permuted_token);
  const int64_t rows = p.expanded_rows();
  const bool fused_gemm1 = impl_->gated(t1);
  const int splits = impl_->split_k(t2);

  const bool needs_activation = activation_stage_runs(p, fused_gemm1, ptrs.fc1_bias != nullptr);
  GemmOperands ops;
  ops.tokens = static_cast<const char*>(ptrs.input);
  ops.permuted_token = permuted_token;
  ops.act_out = base + layout.act_out;
  ops.gathered = base + layout.gathered;
  ops.fc1_weights = static_cast<const char*>(ptrs.fc1_weights);
  ops.fc1_scales = static_cast<const char*>(ptrs.fc1_scales);
  ops.fc1_zeros = static_cast<const char*>(ptrs.fc1_zeros);
  ops.fc1_out = base + layout.fc1_out;
  ops.gemm2_a = (needs_activation || fused_gemm1) ? base + layout.act_out : base + layout.fc1_out;
  ops.fc2_weights = static_cast<const char*>(ptrs.fc2_weights);
  ops.fc2_scales = static_cast<const char*>(ptrs.fc2_scales);
  ops.fc2_zeros = static_cast<const char*>(ptrs.fc2_zeros);
  ops.fc2_out = base + layout.gathered;  // a plain GEMM1 has consumed the gathered rows by then
  ops.fc2_partials = base + layout.fc2_partials;
  const GemmArgsWriter writer = layout.writer(p, base, ops, act_dtype_, weight_dtype_, splits);

  // Routing also writes the grouped GEMMs' arguments (no launch of their own).
  launch_routing(ptrs.token_selected_experts, p.num_tokens, p.top_k, p.num_experts,
                 p.expert_start, offsets, permuted_to_source, source_to_permuted,
                 permuted_expert, permuted_token, base + layout.routing_scratch,
                 layout.routing_scratch_bytes, stream, &writer, pdl);
  // A fused gated GEMM1 reads the token rows itself.
  if (!fused_gemm1) {
    launch_gather_rows(act_dtype_, ptrs.input, permuted_to_source, offsets, p.num_experts,
                       p.num_tokens, p.top_k, p.hidden_size, base + layout.gathered, stream, pdl);
  }

  if (fused_gemm1) {
    GroupedGemmArgs args = layout.gemm_args(kArgsGemm1Gated, base, p.num_experts);
    args.gated = GatedEpilogueArgs{static_cast<int>(p.activation), ptrs.fc1_bias,
                                   ptrs.swiglu_alpha, ptrs.swiglu_beta, ptrs.swiglu_limit,
                                   ptrs.situ_beta,    ptrs.situ_linear_beta};
    args.group_size = static_cast<int>(p.fc1_group_size);
    args.pdl = pdl;
    impl_->launch(t1, 1, args,
                  impl_->threadblock_count(t1, state, rows, p.num_experts, p.inter_size), stream);
  } else {
    GroupedGemmArgs args = layout.gemm_args(kArgsGemm1, base, p.num_experts);
    args.group_size = static_cast<int>(p.fc1_group_size);
    args.pdl = pdl;
    impl_->launch(t1, 1, args,
                  impl_->threadblock_count(t1, state, rows, p.num_experts, p.fc1_out_size()),
                  stream);
  }
  if (needs_activation) {
    launch_activation(act_dtype_, p.activation, base + layout.fc1_out, base + layout.act_out,
                      rows, p.inter_size, offsets, p.num_experts, permuted_expert, ptrs.fc1_bias,
                      ActivationParams{ptrs.swiglu_alpha, ptrs.swiglu_beta, ptrs.swiglu_limit,
                                       ptrs.situ_beta, ptrs.situ_linear_beta,
                                       ptrs.clamped_relu2_limit},
                      stream, pdl);
  }
  GroupedGemmArgs args2 =
      splits > 1 ? layout.gemm_args(split_args_index(splits), base, p.num_experts * splits)
                 : layout.gemm_args(kArgsGemm2, base, p.num_experts);
  args2.group_size = static_cast<int>(p.fc2_group_size);
  args2.pdl = pdl;
  impl_->launch(t2, 2, args2,
                impl_->threadblock_count(t2, state, rows, p.num_experts, p.hidden_size), stream);
  launch_finalize(act_dtype_, out_dtype_,
                  splits > 1 ? base + layout.fc2_partials : base + layout.gathered,
                  source_to_permuted, ptrs.token_selected_experts, ptrs.token_final_scales,
                  ptrs.fc2_bias, p.expert_start, p.num_tokens, p.top_k, p.hidden_size,
                  ptrs.output, stream, splits, pdl);
}

void MoeRunner::prepare_gemm_profile(int gemm, const MoeProblem& p, const void* weights,
                                     const void* scales, const void* zeros, void* workspace,
                                     size_t workspace_bytes, uint64_t seed,
                                     cudaStream_t stream) const {
  check_problem(p, weight_dtype_);
  if (gemm != 1 && gemm != 2) throw InvalidArgument("gemm must be 1 or 2");
  if (weight_dtype_ == DType::kInt8 && scales == nullptr) {
    throw InvalidArgument("int8 weights need their per-channel scales for profiling");
  }
  check_group_sizes(p, weight_dtype_, gemm);
  if (is_group_scaled(weight_dtype_) && scales == nullptr) {
    throw InvalidArgument(std::string(dtype_name(weight_dtype_)) +
                          " weights need their group-wise scales for profiling");
  }
  if (zeros != nullptr && weight_dtype_ != DType::kInt4) {
    throw InvalidArgument("zero points are for int4 weights only");
  }
  // Every buffer, so that one set-up serves every tactic.
  const WorkspaceLayout layout = WorkspaceLayout::make(p, dtype_size(act_dtype_), WorkspacePlan{});
  if (!weights || !workspace) throw InvalidArgument("weights and workspace must be non-null");
  if (workspace_bytes < layout.total) {
    throw InvalidArgument("workspace has " + std::to_string(workspace_bytes) +
                          " bytes, profiling needs " + std::to_string(layout.total));
  }
  char* base = static_cast<char*>(workspace);
  auto* offsets = reinterpret_cast<int64_t*>(base + layout.expert_first_token_offset);
  const int64_t rows = p.expanded_rows();
  synthetic_offsets_kernel<<<1, 256, 0, stream>>>(
      rows, p.num_experts, seed, reinterpret_cast<int*>(base + layout.expert_counts), offsets,
      reinterpret_cast<int32_t*>(base + layout.permuted_token));
  CUTLASS_MOE_CHECK_LAUNCH("synthetic_offsets_kernel");

  GemmOperands ops;
  ops.tokens = base + layout.gathered;  // the synthetic routing maps row r to token row r
  ops.permuted_token = reinterpret_cast<const int32_t*>(base + layout.permuted_token);
  ops.act_out = base + layout.act_out;
  ops.gathered = base + layout.gathered;
  ops.fc1_weights = static_cast<const char*>(gemm == 1 ? weights : nullptr);
  ops.fc1_scales = static_cast<const char*>(gemm == 1 ? scales : nullptr);
  ops.fc1_zeros = static_cast<const char*>(gemm == 1 ? zeros : nullptr);
  ops.fc1_out = base + layout.fc1_out;
  ops.gemm2_a = base + layout.act_out;
  ops.fc2_weights = static_cast<const char*>(gemm == 2 ? weights : nullptr);
  ops.fc2_scales = static_cast<const char*>(gemm == 2 ? scales : nullptr);
  ops.fc2_zeros = static_cast<const char*>(gemm == 2 ? zeros : nullptr);
  ops.fc2_out = base + layout.gathered;
  ops.fc2_partials = base + layout.fc2_partials;
  // Every argument set, the split-K ones included where split-K may run, so that one set-up
  // serves every tactic.
  constexpr int kThreads = 128;
  const int blocks = (p.num_experts + kThreads - 1) / kThreads;
  // (Group-scaled weights have no split tactics.)
  const bool split_sets = gemm == 2 && split_k_allowed(p) && !is_group_scaled(weight_dtype_);
  for (int set = 0; set < (split_sets ? 1 + kNumSplitFactors : 1); ++set) {
    const int splits = set == 0 ? 1 : kSplitFactors[set - 1];
    launch_kernel("write_gemm_args_kernel", write_gemm_args_kernel, dim3(blocks),
                  dim3(kThreads), 0, stream, false, static_cast<const int64_t*>(offsets),
                  layout.writer(p, base, ops, act_dtype_, weight_dtype_, splits));
  }

  const size_t input_offset = gemm == 1 ? layout.gathered : layout.act_out;
  const int64_t input_count = rows * (gemm == 1 ? p.hidden_size : p.inter_size);
  if (input_count > 0) {
    const uint64_t fill_seed = hash_u32(seed + 0x5eed) | (uint64_t(gemm) << 40);
    constexpr int kFillThreads = 256;
    const int blocks = static_cast<int>(
        std::min<int64_t>((input_count + kFillThreads - 1) / kFillThreads, 4096));
    if (act_dtype_ == DType::kFloat16) {
      fill_random_kernel<<<blocks, kFillThreads, 0, stream>>>(
          reinterpret_cast<__half*>(base + input_offset), input_count, fill_seed);
    } else {
      fill_random_kernel<<<blocks, kFillThreads, 0, stream>>>(
          reinterpret_cast<__nv_bfloat16*>(base + input_offset), input_count, fill_seed);
    }
    CUTLASS_MOE_CHECK_LAUNCH("fill_random_kernel");
  }
}

void MoeRunner::run_gemm_profile(int gemm, const std::string& tactic, const MoeProblem& p,
                                 void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) const {
  check_problem(p, weight_dtype_);
  if (gemm != 1 && gemm != 2) throw InvalidArgument("gemm must be 1 or 2");
  check_group_sizes(p, weight_dtype_, gemm);
  const WorkspaceLayout layout = WorkspaceLayout::make(p, dtype_size(act_dtype_), WorkspacePlan{});
  if (!workspace || workspace_bytes < layout.total) {
    throw InvalidArgument("workspace is null or smaller than the " +
                          std::to_string(layout.total) + " bytes profiling needs");
  }
  const DeviceState& state = impl_->device_state();
  const size_t index = impl_->find(tactic, gemm, state);
  impl_->check_gated_activation(index, p.activation);
  impl_->check_split_k(index, p);
  if (p.num_tokens == 0) return;
  char* base = static_cast<char*>(workspace);
  const int64_t rows = p.expanded_rows();
  if (gemm == 2) {
    // A split GEMM2's partial sums are added by finalize in a real call; that read (splits x
    // fp32 rows of a decode-sized call) is not timed here.
    const int splits = impl_->split_k(index);
    GroupedGemmArgs args =
        splits > 1 ? layout.gemm_args(split_args_index(splits), base, p.num_experts * splits)
                   : layout.gemm_args(kArgsGemm2, base, p.num_experts);
    args.group_size = static_cast<int>(p.fc2_group_size);
    impl_->launch(index, gemm, args,
                  impl_->threadblock_count(index, state, rows, p.num_experts, p.hidden_size),
                  stream);
    return;
  }
  // GEMM1 is timed with the elementwise stage that follows it in a real call, so that fused
  // gated tactics and plain ones (GEMM1 + activation kernel) compare like for like.
  if (impl_->gated(index)) {
    GroupedGemmArgs args = layout.gemm_args(kArgsGemm1Gated, base, p.num_experts);
    args.gated.activation = static_cast<int>(p.activation);
    args.group_size = static_cast<int>(p.fc1_group_size);
    impl_->launch(index, gemm, args,
                  impl_->threadblock_count(index, state, rows, p.num_experts, p.inter_size),
                  stream);
    return;
  }
  GroupedGemmArgs args = layout.gemm_args(kArgsGemm1, base, p.num_experts);
  args.group_size = static_cast<int>(p.fc1_group_size);
  impl_->launch(index, gemm, args,
                impl_->threadblock_count(index, state, rows, p.num_experts, p.fc1_out_size()),
                stream);
  if (p.activation != Activation::kIdentity) {
    char* offsets = base + layout.expert_first_token_offset;
    launch_activation(act_dtype_, p.activation, base + layout.fc1_out, base + layout.act_out,
                      rows, p.inter_size, reinterpret_cast<const int64_t*>(offsets),
                      p.num_experts, nullptr, nullptr, ActivationParams{}, stream);
  }
}

}  // namespace cutlass_moe
