// Kernel level of the plain 16-bit grouped GEMM: cutlass::gemm::kernel::GemmGrouped (CUTLASS
// 4.2; its arguments, parameters and shared storage are reused as they are) with the project's
// tile order (tile_order.cuh) in place of the stock row-band-major one. Never transposed.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/kernel/gemm_grouped.h"
#include "cutlass/matrix_coord.h"
#include "grouped_gemm/tile_order.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename StockKernel>
struct Sm80GroupedGemmKernel : StockKernel {
  using Mma = typename StockKernel::Mma;
  using Epilogue = typename StockKernel::Epilogue;
  using Params = typename StockKernel::Params;
  using SharedStorage = typename StockKernel::SharedStorage;
  using ProblemVisitor = typename StockKernel::ProblemVisitor;
  using ThreadblockShape = typename Mma::Shape;
  using ElementA = typename Mma::IteratorA::Element;
  using LayoutA = typename Mma::IteratorA::Layout;
  using LayoutB = typename Mma::IteratorB::Layout;
  using LayoutC = typename Epilogue::OutputTileIterator::Layout;
  static_assert(!StockKernel::kTransposed, "transposed problems are not supported");

  CUTLASS_DEVICE
  Sm80GroupedGemmKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    ProblemVisitor problem_visitor(params.problem_visitor, shared_storage.problem_visitor,
                                   blockIdx.x);
    const int thread_idx = threadIdx.x;
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int lane_idx = threadIdx.x % 32;

    while (problem_visitor.next_tile()) {
      const cutlass::gemm::GemmCoord problem_size = problem_visitor.problem_size();
      const int32_t problem_idx = problem_visitor.problem_index();
      const cutlass::MatrixCoord tile_offset =
          grouped_tile_offset<ThreadblockShape::kM, ThreadblockShape::kN>(
              problem_size, problem_visitor.grid_shape(problem_size),
              int32_t(problem_visitor.threadblock_idx()), int(sizeof(ElementA)));

      typename Mma::IteratorA iterator_A(LayoutA(params.lda[problem_idx]),
                                         params.ptr_A[problem_idx],
                                         {problem_size.m(), problem_size.k()}, thread_idx,
                                         cutlass::MatrixCoord(tile_offset.row(), 0));
      typename Mma::IteratorB iterator_B(LayoutB(params.ldb[problem_idx]),
                                         params.ptr_B[problem_idx],
                                         {problem_size.k(), problem_size.n()}, thread_idx,
                                         cutlass::MatrixCoord(0, tile_offset.column()));

      typename Mma::FragmentC accumulators;
      accumulators.clear();

      Mma mma(shared_storage.kernel.main_loop, thread_idx, warp_idx, lane_idx);
      const int gemm_k_iterations =
          (problem_size.k() + ThreadblockShape::kK - 1) / ThreadblockShape::kK;

      // The previous tile's epilogue may still read the shared memory the mainloop reuses.
      __syncthreads();
      mma(gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators);

      typename Epilogue::OutputOp output_op(params.output_op);
      typename Epilogue::OutputTileIterator::Params params_C(LayoutC(params.ldc[problem_idx]));
      typename Epilogue::OutputTileIterator::Params params_D(LayoutC(params.ldd[problem_idx]));
      typename Epilogue::OutputTileIterator iterator_C(params_C, params.ptr_C[problem_idx],
                                                       problem_size.mn(), thread_idx, tile_offset);
      typename Epilogue::OutputTileIterator iterator_D(params_D, params.ptr_D[problem_idx],
                                                       problem_size.mn(), thread_idx, tile_offset);

      Epilogue epilogue(shared_storage.kernel.epilogue, thread_idx, warp_idx, lane_idx);
      epilogue(output_op, iterator_D, accumulators, iterator_C);

      problem_visitor.advance(gridDim.x);
    }
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
