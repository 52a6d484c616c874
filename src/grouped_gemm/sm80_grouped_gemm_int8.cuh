// CUTLASS 2.x Sm80 mixed-input grouped GEMM (W8A16): 16-bit activations x int8 expert weights
// with per-output-channel scales, one problem per expert, scheduled on the device.
//
// Math, per expert e:  D_e[M_e, N] = (A_e[M_e, K] · Q_e[N, K]^T) ⊙ scale_e[N]
//   A_e      activations, fp16 or bf16, row-major [M_e, K], leading dimension lda (>= K).
//   Q_e      int8 weights, row-major [N, K] (K contiguous, i.e. B = Q_e^T column-major),
//            leading dimension ldb (>= K). Dequantised weight: W_e[n, k] = Q_e[n, k] * scale_e[n]
//            (symmetric, per output channel, no zero point).
//   scale_e  N values in the activation dtype, one per output column (per row of Q_e); the
//            pointer is per problem (typically scales + e * N).
//   D_e      row-major [M_e, N] in the activation dtype (or fp32: the partial sums of a GEMM
//            split over K), leading dimension ldd (>= N).
// The int8 tile is upcast to the activation type in registers after the shared-memory load
// (arch::OpMultiplyAddMixedInputUpcast) and multiplied on 16-bit tensor cores with fp32
// accumulation; the scale multiplies the fp32 accumulator in the epilogue and D is rounded once.
// The upcast is exact: every int8 value (-128..127) is representable in fp16 and bf16.
//
// Alignment (16-byte accesses on every operand; the caller checks):
//   K % 16 == 0 (int8 B rows), lda % 8 == 0, ldb % 16 == 0, N % 8 == 0, ldd % 8 == 0;
//   A, Q, D and scale pointers 16-byte aligned (scale_e = scales + e * N is, when N % 8 == 0).
// M_e may be 0 (the expert is skipped). Scale pointers must not be null.
//
// Instantiated by generated files (tools/generate_kernels.py); keep this header free of torch and
// pybind11.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cutlass/arch/arch.h"
#include "cutlass/arch/mma.h"
#include "cutlass/cutlass.h"
// default_epilogue_with_broadcast.h uses DefaultEpilogueSimt without including its header.
#include "cutlass/epilogue/threadblock/default_epilogue_simt.h"
#include "cutlass/epilogue/threadblock/default_epilogue_with_broadcast.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/threadblock/default_mma.h"
#include "cutlass/layout/matrix.h"
#include "cutlass/numeric_types.h"
#include "cutlass_moe/cuda_check.h"
#include "cutlass_moe/tactic.h"
#include "grouped_gemm/kernel_setup.cuh"
#include "grouped_gemm/column_scale_output_op.cuh"
#include "grouped_gemm/sm80_grouped_gemm_column_scaled_kernel.cuh"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename ElementAct, int TileM, int TileN, int TileK, int WarpM, int WarpN, int WarpK,
          int Stages, typename ElementOut = ElementAct>
struct Sm80GroupedGemmInt8 {
  using ElementA = ElementAct;
  using ElementB = int8_t;
  using ElementD = ElementOut;
  using ElementScale = ElementAct;
  using ElementAccumulator = float;

  static constexpr int kAlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;  // 8
  static constexpr int kAlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;  // 16
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;  // 8 (fp32: 4)

  using ThreadblockShape = cutlass::gemm::GemmShape<TileM, TileN, TileK>;
  using WarpShape = cutlass::gemm::GemmShape<WarpM, WarpN, WarpK>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;

  using Mma = typename cutlass::gemm::threadblock::DefaultMma<
      ElementA, cutlass::layout::RowMajor, kAlignmentA,     //
      ElementB, cutlass::layout::ColumnMajor, kAlignmentB,  //
      ElementAccumulator, cutlass::layout::RowMajor, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Stages,
      cutlass::arch::OpMultiplyAddMixedInputUpcast>::ThreadblockMma;

  using OutputOp = ColumnScaleOutputOp<ElementD, ElementScale, kAlignmentD>;

  using Epilogue = typename cutlass::epilogue::threadblock::DefaultEpilogueWithBroadcastTensorOp<
      ThreadblockShape, typename Mma::Operator, ThreadblockShape::kK / WarpShape::kK, ElementD,
      typename OutputOp::ElementT, ElementScale, OutputOp, kAlignmentD>::Epilogue;

  using GemmKernel = Sm80GroupedGemmColumnScaledKernel<Mma, Epilogue>;

  static constexpr int kThreads = GemmKernel::kThreadCount;
  static constexpr int kSmemBytes = int(sizeof(typename GemmKernel::SharedStorage));

  static int prepare() { return prepare_kernel<GemmKernel>(kThreads, kSmemBytes); }

  static void launch(const GroupedGemmArgs& a, int threadblock_count, cudaStream_t stream) {
    if (a.ptr_scale == nullptr) {
      throw InvalidArgument("int8 grouped GEMM needs per-expert scale pointers (ptr_scale)");
    }
    // Params built per call (no state kept between calls): thread-safe and graph-capturable.
    typename GemmKernel::Params params;
    params.problem_visitor = typename GemmKernel::ProblemVisitor::Params(
        static_cast<const cutlass::gemm::GemmCoord*>(a.problem_sizes), a.problem_count);
    params.ptr_A = reinterpret_cast<ElementA**>(a.ptr_a);
    params.ptr_B = reinterpret_cast<ElementB**>(a.ptr_b);
    params.ptr_D = reinterpret_cast<ElementD**>(a.ptr_d);
    params.ptr_scale = reinterpret_cast<ElementScale**>(a.ptr_scale);
    params.lda = a.lda;
    params.ldb = a.ldb;
    params.ldd = a.ldd;
    launch_grouped_kernel<GemmKernel>(params, threadblock_count, kThreads, kSmemBytes, stream,
                                      a.pdl);
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
