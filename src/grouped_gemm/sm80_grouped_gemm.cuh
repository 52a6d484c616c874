// CUTLASS 2.x Sm80 tensor-op grouped GEMM, one problem per expert, scheduled on the device.
//
// D_e[M_e, N] = A_e[M_e, K] (row-major) * W_e[N, K]^T, fp32 accumulation, output in the input
// type (or fp32: the partial sums of a GEMM split over K). Problem sizes, pointers and leading dimensions are read from device memory
// (GroupScheduleMode::kDeviceOnly), so a call never synchronises with the host.
// Instantiated by generated files (tools/generate_kernels.py); keep this header free of torch and
// pybind11.
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/numeric_types.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/tactic.h"
#include "grouped_gemm/kernel_setup.cuh"
#include "grouped_gemm/sm80_grouped_gemm_kernel.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename Element, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages, typename ElementOut = Element>
struct Sm80GroupedGemm {
  // 16-byte accesses on every operand: K and N must be multiples of 8 (checked by the runner).
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignmentOut = 128 / cutlass::sizeof_bits<ElementOut>::value;

  using EpilogueOp =
      cutlass::epilogue::thread::LinearCombination<ElementOut, kAlignmentOut, float, float>;

  using StockKernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignment,  // A
      Element, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignment,  // B
      ElementOut, cutlass::layout::RowMajor,                                               // C, D
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<TileM, TileN, TileK>, cutlass::gemm::GemmShape<WarpM, WarpN, WarpK>,
      cutlass::gemm::GemmShape<16, 8, 16>, EpilogueOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, Stages,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  // The stock kernel with the project's tile order (tile_order.cuh).
  using GemmKernel = Sm80GroupedGemmKernel<StockKernel>;

  static constexpr int kThreads = GemmKernel::kThreadCount;
  static constexpr int kSmemBytes = int(sizeof(typename GemmKernel::SharedStorage));

  static int prepare() { return prepare_kernel<GemmKernel>(kThreads, kSmemBytes); }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    typename GemmKernel::Arguments args(
        static_cast<cutlass::gemm::GemmCoord*>(a.problem_sizes), a.problem_count,
        threadblock_count, typename EpilogueOp::Params(1.0f, 0.0f),
        reinterpret_cast<Element**>(a.ptr_a), reinterpret_cast<Element**>(a.ptr_b),
        // beta = 0: the epilogue never reads C, so D stands in for it.
        reinterpret_cast<ElementOut**>(a.ptr_d), reinterpret_cast<ElementOut**>(a.ptr_d), a.lda,
        a.ldb, a.ldd, a.ldd);
    // Params built per call (no state kept between calls): thread-safe and graph-capturable.
    typename GemmKernel::Params params(args);
    launch_grouped_kernel<GemmKernel>(params, threadblock_count, kThreads, kSmemBytes, stream,
                                      a.pdl);
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
