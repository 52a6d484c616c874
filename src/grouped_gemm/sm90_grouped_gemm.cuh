// CUTLASS 3.x Hopper grouped GEMM (sm_90a): TMA loads and stores, wgmma, a warp-specialized
// persistent kernel (cooperative or ping-pong), one problem per expert.
//
// D_e[M_e, N] = A_e[M_e, K] (row-major) * W_e[N, K]^T, fp32 accumulation, output in the input
// type, no source operand (the epilogue never reads C). Problem sizes, pointers and leading
// dimensions are the same device-resident arrays the Sm80 tactics read (GroupedGemmArgs), read
// in place as CUTLASS 3.x's per-group problem shapes and strides (the layouts are checked below):
// nothing about the rows per expert reaches the host.
//
// Each persistent CTA keeps copies of its TMA descriptors (A, B and one D per consumer warp
// group) in global memory and rewrites them on the device whenever it moves to another group.
// That scratch is GroupedGemmArgs::kernel_workspace (workspace_bytes(ctas) bytes, a region of
// the MoE workspace): every CTA writes its own copies before reading them, so it needs no
// initialisation. The kernel parameters are built on the host for every launch (descriptors
// encoded by the driver with placeholder shapes, replaced on the device per group), with no
// allocation, copy or synchronisation: thread-safe and graph-capturable.
//
// sm_90a only: these instances are compiled for `-gencode arch=compute_90a,code=sm_90a` in a
// separate object library (CMake option CUTLASS_MOE_SM90_TACTICS) and listed by the runner only
// on compute capability 9.0 (GemmTactic::required_cc). Compiled for plain sm_90, CUTLASS's
// kernel body would be an empty stub; the #error below refuses that build.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm_coord.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/numeric_types.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/tactic.h"
#include "launch.cuh"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the sm90 grouped GEMM tactics need CUDA 12.3 or newer (device-side TMA descriptor updates)"
#endif
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the sm90 grouped GEMM tactics compile for sm_90a only (-gencode arch=compute_90a,code=sm_90a)"
#endif

namespace cutlass_moe {
namespace grouped_gemm {
namespace sm90 {

// CUTLASS 3.x reads one (M, N, K) per group and one stride per operand and group; the runner's
// routing kernel writes cutlass::gemm::GemmCoord (m, n, k) and int64 leading dimensions. Both
// are read in place, which these checks make safe: same size, alignment and byte order.
using ProblemShapeMNK = cute::Shape<int, int, int>;
// A (M x K, K contiguous), B (N x K, K contiguous: the [N, K] expert weight) and D (M x N, N
// contiguous): (leading dimension, 1, no batch stride).
using LeadingStride = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;

struct ThreeInts {
  int v[3];
};
static_assert(cutlass::gemm::GemmCoord::kM == 0 && cutlass::gemm::GemmCoord::kN == 1 &&
                  cutlass::gemm::GemmCoord::kK == 2,
              "GemmCoord keeps m, n, k in this order");
static_assert(sizeof(ProblemShapeMNK) == sizeof(cutlass::gemm::GemmCoord) &&
                  alignof(ProblemShapeMNK) == alignof(cutlass::gemm::GemmCoord) &&
                  sizeof(cutlass::gemm::GemmCoord) == sizeof(ThreeInts),
              "a 3.x problem shape has GemmCoord's size and alignment");
static_assert(std::is_trivially_copyable<ProblemShapeMNK>::value &&
                  std::is_trivially_copyable<cutlass::gemm::GemmCoord>::value,
              "problem shapes are plain bytes");
static_assert(__builtin_bit_cast(ThreeInts, ProblemShapeMNK{11, 22, 33}).v[0] == 11 &&
                  __builtin_bit_cast(ThreeInts, ProblemShapeMNK{11, 22, 33}).v[1] == 22 &&
                  __builtin_bit_cast(ThreeInts, ProblemShapeMNK{11, 22, 33}).v[2] == 33,
              "a 3.x problem shape keeps M, N, K at GemmCoord's offsets");
static_assert(sizeof(LeadingStride) == sizeof(int64_t) &&
                  alignof(LeadingStride) == alignof(int64_t) &&
                  std::is_trivially_copyable<LeadingStride>::value,
              "a 3.x stride (ld, _1, _0) is one int64");
static_assert(__builtin_bit_cast(int64_t, LeadingStride{int64_t(4097), {}, {}}) == 4097,
              "a 3.x stride (ld, _1, _0) keeps ld at offset 0");

// The kernel entry (cutlass::device_kernel with the wait of a programmatically dependent launch
// first: see launch.cuh). The parameters hold the TMA descriptors, hence __grid_constant__.
template <typename GemmKernel>
__global__ void __launch_bounds__(GemmKernel::MaxThreadsPerBlock,
                                  GemmKernel::MinBlocksPerMultiprocessor)
    grouped_kernel(CUTLASS_GRID_CONSTANT typename GemmKernel::Params const params) {
  wait_on_dependencies();
  extern __shared__ char sm90_shared_storage[];
  GemmKernel op;
  op(params, sm90_shared_storage);
}

}  // namespace sm90

// Pingpong: two consumer warp groups on alternate tiles of TileM rows each (decode-ish tiles);
// otherwise cooperative: both warp groups on one tile (TileM >= 128), split along M.
template <typename Element, int TileM, int TileN, int TileK, int ClusterM, int ClusterN,
          bool Pingpong>
struct Sm90GroupedGemm {
  // TMA moves 16-byte-aligned rows: K and N multiples of 8 (checked by the runner), every
  // problem's pointers 16-byte aligned (the runner's offsets are multiples of 8 elements).
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kClusterSize = ClusterM * ClusterN;

  using ProblemShape = cutlass::gemm::GroupProblemShape<sm90::ProblemShapeMNK>;
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using MainloopSchedule =
      std::conditional_t<Pingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule =
      std::conditional_t<Pingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;

  // D = 1 * accumulator, no source C (void): no C descriptor, load or shared memory.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor*, kAlignment,     // C (none)
      Element, cutlass::layout::RowMajor*, kAlignment,  // D
      EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

  // As many pipeline stages as fit next to the epilogue's shared memory.
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor*, kAlignment,     // A
      Element, cutlass::layout::ColumnMajor*, kAlignment,  // B: the [N, K] weight, K contiguous
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;

  static_assert(std::is_same<typename GemmKernel::InternalStrideA, sm90::LeadingStride>::value &&
                    std::is_same<typename GemmKernel::InternalStrideB, sm90::LeadingStride>::value &&
                    std::is_same<typename GemmKernel::InternalStrideD, sm90::LeadingStride>::value,
                "the int64 leading-dimension arrays serve as the 3.x per-group strides");
  static_assert(GemmKernel::IsGroupedGemmKernel, "a grouped (per-problem shape) kernel");

  static constexpr int kThreads = static_cast<int>(GemmKernel::MaxThreadsPerBlock);
  static constexpr int kSmemBytes = static_cast<int>(GemmKernel::SharedStorageSize);
  static constexpr int kStages = CollectiveMainloop::DispatchPolicy::Stages;

  // Persistent CTAs for the runner's `threadblock_count` (at most one wave): within the
  // workspace's capacity and a whole number of clusters.
  static int persistent_ctas(int threadblock_count) {
    const int ctas = std::min(std::max(threadblock_count, 1), kMaxPersistentCtas);
    return std::max(kClusterSize, ctas / kClusterSize * kClusterSize);
  }

  // The arguments of one launch on `ctas` persistent CTAs (pointer arrays as in GroupedGemmArgs).
  static typename GemmKernel::Arguments arguments(const GroupedGemmArgs& a, int ctas) {
    typename GemmKernel::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    // Host problem shapes stay null: the shapes exist on the device only.
    args.problem_shape = ProblemShape{
        a.problem_count, reinterpret_cast<sm90::ProblemShapeMNK*>(a.problem_sizes), nullptr};
    args.mainloop.ptr_A = const_cast<const Element**>(reinterpret_cast<Element**>(a.ptr_a));
    args.mainloop.dA = reinterpret_cast<sm90::LeadingStride*>(a.lda);
    args.mainloop.ptr_B = const_cast<const Element**>(reinterpret_cast<Element**>(a.ptr_b));
    args.mainloop.dB = reinterpret_cast<sm90::LeadingStride*>(a.ldb);
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = nullptr;
    args.epilogue.ptr_D = reinterpret_cast<Element**>(a.ptr_d);
    args.epilogue.dD = reinterpret_cast<sm90::LeadingStride*>(a.ldd);
    // The SM count CUTLASS sizes its grid and its descriptor workspace by (the grid never
    // exceeds it: see launch).
    args.hw_info.sm_count = ctas;
    args.hw_info.max_active_clusters = 0;
    return args;
  }

  // Bytes of kernel workspace (TMA descriptor copies) for `ctas` persistent CTAs, as the kernel
  // itself computes it.
  static size_t workspace_bytes(int ctas) {
    typename GemmKernel::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.hw_info.sm_count = ctas;
    return GemmKernel::get_workspace_size(args);
  }

  // One CTA per SM on compute capability 9.0 when the shared memory fits; 0 elsewhere (the
  // runner never calls this on another device; the check keeps a direct call harmless).
  static int prepare() {
    int device = 0;
    CUTLASS_MOE_CHECK_CUDA(cudaGetDevice(&device));
    int major = 0, minor = 0, smem_optin = 0;
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0) return 0;
    CUTLASS_MOE_CHECK_CUDA(
        cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (kSmemBytes > smem_optin) return 0;
    CUTLASS_MOE_CHECK_CUDA(cudaFuncSetAttribute(sm90::grouped_kernel<GemmKernel>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                kSmemBytes));
    int blocks_per_sm = 0;
    CUTLASS_MOE_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks_per_sm, sm90::grouped_kernel<GemmKernel>, kThreads, kSmemBytes));
    // Persistent: the grid is one wave of at most one CTA per SM.
    return blocks_per_sm > 0 ? 1 : 0;
  }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    const int ctas = persistent_ctas(threadblock_count);
    const size_t needed = workspace_bytes(ctas);
    if (a.kernel_workspace == nullptr || a.kernel_workspace_bytes < needed) {
      throw InvalidArgument("the sm90 grouped GEMM needs " + std::to_string(needed) +
                            " bytes of kernel workspace for " + std::to_string(ctas) +
                            " CTAs, got " + std::to_string(a.kernel_workspace_bytes));
    }
    if (reinterpret_cast<uintptr_t>(a.kernel_workspace) % 128 != 0) {
      throw InvalidArgument("the sm90 grouped GEMM's kernel workspace must be 128-byte aligned");
    }
    const typename GemmKernel::Arguments args = arguments(a, ctas);
    // Host-side checks only (grouped mode, rank-3 shapes, beta = 0 without C): the per-problem
    // alignment checks need host problem shapes, which do not exist here.
    if (!GemmKernel::can_implement(args)) {
      throw InvalidArgument("the sm90 grouped GEMM cannot implement these arguments");
    }
    // A no-op for this kernel (each CTA writes its own descriptor copies); anything it did
    // would go onto `stream`.
    if (GemmKernel::initialize_workspace(args, a.kernel_workspace, stream) !=
        cutlass::Status::kSuccess) {
      throw std::runtime_error("the sm90 grouped GEMM's workspace initialisation failed");
    }
    const typename GemmKernel::Params params =
        GemmKernel::to_underlying_arguments(args, a.kernel_workspace);
    const dim3 grid = GemmKernel::get_grid_shape(params);
    // Each CTA indexes its descriptor copies by its linear block index, below the SM count
    // the workspace was sized for; clusters tile the grid.
    const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    if (blocks < 1 || blocks > ctas || grid.x % ClusterM != 0 || grid.y % ClusterN != 0) {
      throw std::logic_error("sm90 grouped GEMM: unexpected grid " + std::to_string(grid.x) +
                             "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
                             " for " + std::to_string(ctas) + " CTAs");
    }
    cudaLaunchAttribute attributes[2];
    unsigned count = 0;
    if (kClusterSize > 1) {
      attributes[count].id = cudaLaunchAttributeClusterDimension;
      attributes[count].val.clusterDim.x = ClusterM;
      attributes[count].val.clusterDim.y = ClusterN;
      attributes[count].val.clusterDim.z = 1;
      ++count;
    }
    if (a.pdl) {
      attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attributes[count].val.programmaticStreamSerializationAllowed = 1;
      ++count;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads, 1, 1);
    config.dynamicSmemBytes = static_cast<size_t>(kSmemBytes);
    config.stream = stream;
    config.attrs = count ? attributes : nullptr;
    config.numAttrs = count;
    const cudaError_t status =
        cudaLaunchKernelEx(&config, sm90::grouped_kernel<GemmKernel>, params);
    if (status != cudaSuccess) {
      throw_cuda_error(status, "sm90 grouped GEMM", __FILE__, __LINE__);
    }
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
