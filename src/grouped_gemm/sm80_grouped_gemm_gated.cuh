// Fused gated GEMM1 tactics ("sm80_gated"): token-row gather + both halves of W1 + bias +
// the gated activation (SwiGLU, GeGLU, GeGLU-tanh, SwiGLU-step, SiTU-GLU) in one grouped kernel
// (see sm80_grouped_gemm_gated_kernel.cuh).
//
// Operands as in Sm80GroupedGemm (A row-major, weights [2I, K] row-major = column-major B, fp32
// accumulation), except that A is the token matrix read through per-problem row indices and the
// problem's N is I, the output width.
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/threadblock/default_mma.h"
#include "cutlass/numeric_types.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/tactic.h"
#include "grouped_gemm/gated_activation_op.cuh"
#include "grouped_gemm/kernel_setup.cuh"
#include "grouped_gemm/sm80_grouped_gemm_gated_kernel.cuh"
// CUTLASS's dual-GEMM blocks (examples/45_dual_gemm, on the include path).
#include "threadblock/dual_epilogue.h"
#include "threadblock/dual_mma_multistage.h"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename Element, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages>
struct Sm80GroupedGemmGated {
  // 16-byte accesses on every operand: K and I must be multiples of 8 (checked by the runner).
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using ThreadblockShape = cutlass::gemm::GemmShape<TileM, TileN, TileK>;
  using WarpShape = cutlass::gemm::GemmShape<WarpM, WarpN, WarpK>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;

  using Mma = typename cutlass::gemm::threadblock::DefaultMma<
      Element, cutlass::layout::RowMajor, kAlignment, Element, cutlass::layout::ColumnMajor,
      kAlignment, float, cutlass::layout::RowMajor, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Stages,
      cutlass::arch::OpMultiplyAdd, /*AccumulatorsInRowMajor=*/false,
      cutlass::gemm::SharedMemoryClearOption::kNone, /*GatherA=*/true>::ThreadblockMma;

  // Gate and up share the A tile, the B iterator type and the warp-level policy.
  using DualMma = cutlass::gemm::threadblock::DualMmaMultistage<
      typename Mma::Shape, typename Mma::IteratorA, typename Mma::SmemIteratorA, Mma::kCacheOpA,
      typename Mma::IteratorB, typename Mma::SmemIteratorB, Mma::kCacheOpB,
      typename Mma::IteratorB, typename Mma::SmemIteratorB, typename Mma::ElementC,
      typename Mma::LayoutC, typename Mma::Policy, typename Mma::Policy, Stages,
      cutlass::gemm::SharedMemoryClearOption::kNone>;

  static constexpr int kPartitionsK = TileK / WarpK;
  using LinearOp =
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>;
  using GatedOp = GatedActivationOp<Element, kAlignment>;
  using Epilogue = typename cutlass::epilogue::threadblock::DefaultEpilogueTensorOp<
      ThreadblockShape, typename DualMma::Operator0, kPartitionsK, LinearOp,
      kAlignment>::Epilogue;
  using DualEpilogue = cutlass::epilogue::threadblock::DualEpilogue<
      typename Epilogue::Shape, typename Epilogue::WarpMmaOperator, Epilogue::kPartitionsK,
      typename Epilogue::OutputTileIterator, typename Epilogue::AccumulatorFragmentIterator,
      typename Epilogue::WarpTileIterator, typename Epilogue::SharedLoadIterator, LinearOp,
      LinearOp, GatedOp, typename Epilogue::Padding, /*StoreD0=*/false, /*StoreD1=*/false,
      Epilogue::kFragmentsPerIteration, /*IterationsUnroll=*/true>;

  using GemmKernel = Sm80GroupedGemmGatedKernel<DualMma, DualEpilogue>;

  static constexpr int kThreads = GemmKernel::kThreadCount;
  static constexpr int kSmemBytes = int(sizeof(typename GemmKernel::SharedStorage));

  static int prepare() { return prepare_kernel<GemmKernel>(kThreads, kSmemBytes); }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    if (a.ptr_rows == nullptr) {
      throw InvalidArgument("fused gated GEMM1: the row-index arrays are missing");
    }
    typename GemmKernel::Params params;
    params.problem_visitor = typename GemmKernel::ProblemVisitor::Params(
        static_cast<cutlass::gemm::GemmCoord*>(a.problem_sizes), a.problem_count, nullptr, 0);
    params.activation = GatedActivationParams{a.gated.activation,   a.gated.swiglu_alpha,
                                              a.gated.swiglu_beta,  a.gated.swiglu_limit,
                                              a.gated.situ_beta,    a.gated.situ_linear_beta};
    params.ptr_A = reinterpret_cast<Element**>(a.ptr_a);
    params.ptr_rows = a.ptr_rows;
    params.ptr_B = reinterpret_cast<Element**>(a.ptr_b);
    params.ptr_D = reinterpret_cast<Element**>(a.ptr_d);
    params.lda = a.lda;
    params.ldb = a.ldb;
    params.ldd = a.ldd;
    params.bias = static_cast<const Element*>(a.gated.bias);
    // Params built per call (no state kept between calls): thread-safe and graph-capturable.
    launch_grouped_kernel<GemmKernel>(params, threadblock_count, kThreads, kSmemBytes, stream,
                                      a.pdl);
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
