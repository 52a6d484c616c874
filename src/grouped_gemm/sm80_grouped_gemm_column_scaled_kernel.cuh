// Kernel level of a grouped GEMM whose epilogue multiplies each output column by a per-problem
// vector: D_p = (A_p * B_p) ⊙ scale_p[column], one problem p per expert.
//
// A project-owned counterpart of cutlass::gemm::kernel::GemmGrouped (CUTLASS 4.2). Two reasons
// not to use the stock kernel:
//   - with mixed element types (16-bit A, int8 B) the stock kernel's `kTransposed ? ptr_B : ptr_A`
//     ternary mixes pointer types and does not compile; this kernel never transposes;
//   - the scale vector differs per problem, so its pointer is read from a device array per
//     problem, like A, B and D, and handed to an EpilogueWithBroadcast.
// Scheduling is CUTLASS's GemmGroupedProblemVisitor: persistent blocks walk the tiles of all
// problems; problem sizes are read from device memory (kDeviceOnly), so no host synchronisation.
// The tile loop and mainloop are the project's (tile_loop.cuh, with its tile order).
//
// Template parameters: a threadblock-scoped Mma (e.g. from cutlass::gemm::threadblock::DefaultMma)
// and an EpilogueWithBroadcast whose output op is single-source and does not store T.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/gemm_grouped_problem_visitor.h"
#include "cutlass/matrix_coord.h"
#include "grouped_gemm/tile_loop.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename Mma_, typename Epilogue_,
          cutlass::gemm::kernel::GroupScheduleMode kScheduleMode =
              cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>
struct Sm80GroupedGemmColumnScaledKernel {
  using Mma = Mma_;
  using Epilogue = Epilogue_;
  using EpilogueOutputOp = typename Epilogue::OutputOp;

  using ElementA = typename Mma::IteratorA::Element;
  using ElementB = typename Mma::IteratorB::Element;
  using ElementD = typename Epilogue::OutputTileIterator::Element;
  using LayoutD = typename Epilogue::OutputTileIterator::Layout;
  using ElementScale = typename Epilogue::ElementVector;

  using ThreadblockShape = typename Mma::Shape;
  using WarpCount = typename Mma::WarpCount;
  static constexpr int kThreadCount = 32 * WarpCount::kCount;

  static_assert(Epilogue::kIsSingleSource, "the output op must take a single source");
  static_assert(!EpilogueOutputOp::kStoreT, "the auxiliary T tensor is not supported");

  using ProblemVisitor =
      cutlass::gemm::kernel::GemmGroupedProblemVisitor<ThreadblockShape, kScheduleMode,
                                                       kThreadCount, kThreadCount,
                                                       /*Transposed=*/false>;

  // Device-resident per-problem arrays; all have one entry per problem.
  struct Params {
    typename ProblemVisitor::Params problem_visitor{};
    typename EpilogueOutputOp::Params output_op{};
    ElementA** ptr_A = nullptr;
    ElementB** ptr_B = nullptr;
    ElementD** ptr_D = nullptr;
    ElementScale** ptr_scale = nullptr;  // each: N values, 16-byte aligned, never null
    int64_t* lda = nullptr;
    int64_t* ldb = nullptr;
    int64_t* ldd = nullptr;
  };

  struct SharedStorage {
    union {
      typename Mma::SharedStorage main_loop;
      typename Epilogue::SharedStorage epilogue;
    } kernel;
    // Not overlapped: the visitor's state lives across tiles.
    typename ProblemVisitor::SharedStorage problem_visitor;
  };

  CUTLASS_DEVICE
  Sm80GroupedGemmColumnScaledKernel() {}

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    for_each_multiplied_tile<Mma, ProblemVisitor, ElementA>(
        params, shared_storage,
        [&](GroupedTile const& tile, typename Mma::FragmentC const& accumulators) {
          // Epilogue: D = convert(accumulator * float(scale[column])), on the fp32 accumulator.
          const int p = tile.problem_idx;
          const int thread_idx = threadIdx.x;
          const cutlass::MatrixCoord extent = tile.problem_size.mn();
          EpilogueOutputOp output_op(params.output_op);
          typename Epilogue::OutputTileIterator::Params params_D(LayoutD(params.ldd[p]));
          typename Epilogue::OutputTileIterator iterator_D(params_D, params.ptr_D[p], extent,
                                                           thread_idx, tile.offset);
          // T is never stored (kStoreT is false): its iterator only satisfies the interface.
          typename Epilogue::TensorTileIterator::Params params_T(LayoutD(0));
          typename Epilogue::TensorTileIterator iterator_T(params_T, nullptr, extent, thread_idx,
                                                           tile.offset);

          // EpilogueWithBroadcast offsets the vector by the thread's column only (its bounds
          // check uses the tile offset): the caller moves the pointer to the tile's first column.
          const ElementScale* scale = params.ptr_scale[p];
          if (scale != nullptr) scale += tile.offset.column();

          Epilogue epilogue(shared_storage.kernel.epilogue, thread_idx,
                            cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
          // The source operand is not read (beta = 0): D stands in for it.
          epilogue(output_op, scale, iterator_D, accumulators, iterator_D, iterator_T, extent,
                   tile.offset);
        });
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
