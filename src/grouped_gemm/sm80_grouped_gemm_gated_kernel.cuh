// Kernel level of the fused gated GEMM1: per expert e (one grouped problem),
//
//   out_e[m, n] = act(gate_e[m, n]) * up_e[m, n],   m < M_e, n < I
//   up_e   = A_e * W_e[0:I, :]^T   (+ bias_e[0:I])
//   gate_e = A_e * W_e[I:2I, :]^T  (+ bias_e[I:2I])
//
// where A_e's rows are gathered from the token matrix through an index array (row m of problem e
// is token rows_e[m]), so neither the gathered input nor the [M, 2I] GEMM1 output is ever written
// to memory, and no separate gather or activation kernel runs.
//
// Built from CUTLASS's dual-GEMM blocks (examples/45_dual_gemm): DualMmaMultistage streams one A
// tile and two B tiles (the up and gate rows of the same expert) per stage into two accumulators
// of identical layout; DualEpilogue stages both through shared memory, applies a linear
// combination to each (which adds the bias, broadcast down the rows with a zero row stride), then
// the gated op combines them and only that result is stored. Scheduling is CUTLASS's
// GemmGroupedProblemVisitor with device-resident problem sizes (no host synchronisation), walked
// by the tile loop the project's grouped kernels share (tile_loop.cuh, with its tile order).
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/gemm_grouped_problem_visitor.h"
#include "cutlass/matrix_coord.h"
#include "grouped_gemm/gated_activation_op.cuh"
#include "grouped_gemm/tile_loop.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename DualMma_, typename DualEpilogue_>
struct Sm80GroupedGemmGatedKernel {
  using DualMma = DualMma_;
  using Epilogue = DualEpilogue_;
  using LinearOp = typename Epilogue::OutputOp0;
  using GatedOp = typename Epilogue::OutputOp2;
  using OutputTileIterator = typename Epilogue::OutputTileIterator;

  using ElementA = typename DualMma::IteratorA::Element;
  using LayoutA = typename DualMma::IteratorA::Layout;
  using ElementB = typename DualMma::IteratorB0::Element;
  using LayoutB = typename DualMma::IteratorB0::Layout;
  using ElementD = typename OutputTileIterator::Element;
  using LayoutD = typename OutputTileIterator::Layout;

  using ThreadblockShape = typename DualMma::Shape;
  using WarpCount = typename DualMma::WarpCount;
  static constexpr int kThreadCount = 32 * WarpCount::kCount;

  static_assert(!Epilogue::kStoreD0 && !Epilogue::kStoreD1,
                "only the combined result is stored");

  using ProblemVisitor =
      cutlass::gemm::kernel::GemmGroupedProblemVisitor<ThreadblockShape,
                                                       cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly,
                                                       kThreadCount, kThreadCount,
                                                       /*Transposed=*/false>;

  // Device-resident per-problem arrays (one entry per problem) and launch-wide values. Problem
  // e's size is (M_e, I, K).
  struct Params {
    typename ProblemVisitor::Params problem_visitor{};
    GatedActivationParams activation{};
    ElementA** ptr_A = nullptr;       // the token matrix [T, K] (the same for every problem)
    int32_t** ptr_rows = nullptr;     // [M_e] token row of each of problem e's rows
    ElementB** ptr_B = nullptr;       // expert weights [2I, K]: up rows, then gate rows
    ElementD** ptr_D = nullptr;       // [M_e, I]
    int64_t* lda = nullptr;
    int64_t* ldb = nullptr;
    int64_t* ldd = nullptr;
    const ElementD* bias = nullptr;   // [E, 2I] (up, then gate) or null
  };

  struct SharedStorage {
    union {
      typename DualMma::SharedStorage main_loop;
      typename Epilogue::SharedStorage epilogue;
    } kernel;
    // Not overlapped: the visitor's state lives across tiles.
    typename ProblemVisitor::SharedStorage problem_visitor;
  };

  CUTLASS_DEVICE
  Sm80GroupedGemmGatedKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    const int thread_idx = threadIdx.x;
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int lane_idx = threadIdx.x % 32;
    for_each_tile<ProblemVisitor, ThreadblockShape, ElementA>(
        params.problem_visitor, shared_storage.problem_visitor, [&](GroupedTile const& tile) {
          const cutlass::gemm::GemmCoord problem_size = tile.problem_size;
          const int32_t problem_idx = tile.problem_idx;
          const cutlass::MatrixCoord tile_offset = tile.offset;

          const int64_t ldb = params.ldb[problem_idx];
          ElementB* up_weights = params.ptr_B[problem_idx];
          ElementB* gate_weights = up_weights + int64_t(problem_size.n()) * ldb;

          typename DualMma::IteratorA iterator_A(
              LayoutA(params.lda[problem_idx]), params.ptr_A[problem_idx],
              {problem_size.m(), problem_size.k()}, thread_idx,
              cutlass::MatrixCoord(tile_offset.row(), 0), params.ptr_rows[problem_idx]);
          typename DualMma::IteratorB0 iterator_gate(
              LayoutB(ldb), gate_weights, {problem_size.k(), problem_size.n()}, thread_idx,
              cutlass::MatrixCoord(0, tile_offset.column()));
          typename DualMma::IteratorB1 iterator_up(
              LayoutB(ldb), up_weights, {problem_size.k(), problem_size.n()}, thread_idx,
              cutlass::MatrixCoord(0, tile_offset.column()));

          typename DualMma::FragmentC accum_gate;
          typename DualMma::FragmentC accum_up;
          accum_gate.clear();
          accum_up.clear();

          DualMma mma(shared_storage.kernel.main_loop, thread_idx, warp_idx, lane_idx);
          mma(tile.k_iterations, accum_gate, accum_up, iterator_A, iterator_gate, iterator_up,
              accum_gate, accum_up);

          // Sources of the two linear combinations: the bias halves, one row read for every output
          // row (row stride 0). Without a bias the extent is empty, so nothing is read and the
          // source fragments stay zero.
          const bool has_bias = params.bias != nullptr;
          const int64_t two_n = 2 * int64_t(problem_size.n());
          ElementD* bias_up =
              has_bias ? const_cast<ElementD*>(params.bias) + problem_idx * two_n : nullptr;
          ElementD* bias_gate = has_bias ? bias_up + problem_size.n() : nullptr;
          const cutlass::MatrixCoord source_extent =
              has_bias ? problem_size.mn() : cutlass::MatrixCoord(0, 0);
          typename OutputTileIterator::Params params_bias(LayoutD(0));
          OutputTileIterator sources[2] = {
              OutputTileIterator(params_bias, bias_gate, source_extent, thread_idx, tile_offset),
              OutputTileIterator(params_bias, bias_up, source_extent, thread_idx, tile_offset)};

          typename OutputTileIterator::Params params_D(LayoutD(params.ldd[problem_idx]));
          OutputTileIterator iterator_D(params_D, params.ptr_D[problem_idx], problem_size.mn(),
                                        thread_idx, tile_offset);

          const LinearOp add_bias(typename LinearOp::Params(1.0f, has_bias ? 1.0f : 0.0f));
          const GatedOp gated(params.activation, problem_idx);
          Epilogue epilogue(shared_storage.kernel.epilogue, thread_idx, warp_idx, lane_idx);
          // D0 and D1 are never stored (kStoreD0/kStoreD1 are false): D stands in for them.
          epilogue(add_bias, add_bias, gated, iterator_D, iterator_D, iterator_D, accum_gate,
                   accum_up, sources, /*writeToD2=*/true);
        });
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
