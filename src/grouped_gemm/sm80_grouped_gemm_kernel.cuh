// Kernel level of the plain 16-bit grouped GEMM: cutlass::gemm::kernel::GemmGrouped (CUTLASS
// 4.2; its arguments, parameters and shared storage are reused as they are) run by the project's
// tile loop (tile_loop.cuh), whose tile order (tile_order.cuh) replaces the stock row-band-major
// one. Never transposed.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/kernel/gemm_grouped.h"
#include "cutlass/matrix_coord.h"
#include "grouped_gemm/tile_loop.cuh"

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
  using LayoutC = typename Epilogue::OutputTileIterator::Layout;
  static_assert(!StockKernel::kTransposed, "transposed problems are not supported");

  CUTLASS_DEVICE
  Sm80GroupedGemmKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    for_each_multiplied_tile<Mma, ProblemVisitor, ElementA>(
        params, shared_storage,
        [&](GroupedTile const& tile, typename Mma::FragmentC const& accumulators) {
          const int p = tile.problem_idx;
          const int thread_idx = threadIdx.x;
          typename Epilogue::OutputOp output_op(params.output_op);
          typename Epilogue::OutputTileIterator::Params params_C(LayoutC(params.ldc[p]));
          typename Epilogue::OutputTileIterator::Params params_D(LayoutC(params.ldd[p]));
          typename Epilogue::OutputTileIterator iterator_C(
              params_C, params.ptr_C[p], tile.problem_size.mn(), thread_idx, tile.offset);
          typename Epilogue::OutputTileIterator iterator_D(
              params_D, params.ptr_D[p], tile.problem_size.mn(), thread_idx, tile.offset);
          Epilogue epilogue(shared_storage.kernel.epilogue, thread_idx,
                            cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
          epilogue(output_op, iterator_D, accumulators, iterator_C);
        });
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
