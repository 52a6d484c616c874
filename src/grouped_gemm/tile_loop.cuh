// The persistent tile loop and the plain mainloop shared by the project's grouped kernels.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/matrix_coord.h"
#include "grouped_gemm/tile_order.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

// One output tile of one problem, as the tile loop hands it to a kernel's body.
struct GroupedTile {
  cutlass::gemm::GemmCoord problem_size;
  int32_t problem_idx;
  cutlass::MatrixCoord offset;  // the tile's first row and column
  int k_iterations;             // ThreadblockShape::kK steps over the problem's K
};

// Runs body(tile) for this block's share of the tiles of all problems: CUTLASS's device-side
// problem visitor hands block b the tiles b, b + gridDim.x, ... of the problems in turn, and
// grouped_tile_offset places each one. A barrier precedes every body: the previous tile's
// epilogue may still read the shared memory the next mainloop reuses.
template <typename ProblemVisitor, typename ThreadblockShape, typename ElementA, typename Body>
CUTLASS_DEVICE void for_each_tile(typename ProblemVisitor::Params const& visitor_params,
                                  typename ProblemVisitor::SharedStorage& visitor_storage,
                                  Body&& body) {
  ProblemVisitor problem_visitor(visitor_params, visitor_storage, blockIdx.x);
  while (problem_visitor.next_tile()) {
    GroupedTile tile;
    tile.problem_size = problem_visitor.problem_size();
    tile.problem_idx = problem_visitor.problem_index();
    tile.offset = grouped_tile_offset<ThreadblockShape::kM, ThreadblockShape::kN>(
        tile.problem_size, problem_visitor.grid_shape(tile.problem_size),
        int32_t(problem_visitor.threadblock_idx()), int(sizeof(ElementA)));
    tile.k_iterations =
        (tile.problem_size.k() + ThreadblockShape::kK - 1) / ThreadblockShape::kK;
    __syncthreads();
    body(tile);
    problem_visitor.advance(gridDim.x);
  }
}

// The mainloop of one tile of a plain problem p: accumulators = A_p[tile rows, :] *
// B_p[:, tile columns], with A_p = params.ptr_A[p] (leading dimension params.lda[p]) and B_p
// likewise from ptr_B and ldb.
template <typename Mma, typename Params>
CUTLASS_DEVICE void multiply_tile(Params const& params, GroupedTile const& tile,
                                  typename Mma::SharedStorage& storage,
                                  typename Mma::FragmentC& accumulators) {
  using LayoutA = typename Mma::IteratorA::Layout;
  using LayoutB = typename Mma::IteratorB::Layout;
  const int p = tile.problem_idx;
  const int thread_idx = threadIdx.x;
  typename Mma::IteratorA iterator_A(LayoutA(params.lda[p]), params.ptr_A[p],
                                     {tile.problem_size.m(), tile.problem_size.k()}, thread_idx,
                                     cutlass::MatrixCoord(tile.offset.row(), 0));
  typename Mma::IteratorB iterator_B(LayoutB(params.ldb[p]), params.ptr_B[p],
                                     {tile.problem_size.k(), tile.problem_size.n()}, thread_idx,
                                     cutlass::MatrixCoord(0, tile.offset.column()));
  accumulators.clear();
  Mma mma(storage, thread_idx, cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
  mma(tile.k_iterations, accumulators, iterator_A, iterator_B, accumulators);
}

// for_each_tile over the tiles of plain problems, each multiplied by multiply_tile: body(tile,
// accumulators) runs the kernel's epilogue. Params and SharedStorage follow CUTLASS's grouped
// kernels (problem_visitor; kernel.main_loop).
template <typename Mma, typename ProblemVisitor, typename ElementA, typename Params,
          typename SharedStorage, typename Body>
CUTLASS_DEVICE void for_each_multiplied_tile(Params const& params, SharedStorage& shared_storage,
                                             Body&& body) {
  for_each_tile<ProblemVisitor, typename Mma::Shape, ElementA>(
      params.problem_visitor, shared_storage.problem_visitor, [&](GroupedTile const& tile) {
        typename Mma::FragmentC accumulators;
        multiply_tile<Mma>(params, tile, shared_storage.kernel.main_loop, accumulators);
        body(tile, accumulators);
      });
}

}  // namespace grouped_gemm
}  // namespace cutlass_moe
