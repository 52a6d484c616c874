// Thread-level epilogue output op: D = convert(accumulator * scale[column]).
//
// Follows the interface cutlass::epilogue::threadblock::EpilogueWithBroadcast expects of its
// output op (the broadcast vector V is the per-column scale, already converted to fp32 by the
// epilogue). The product is taken on the fp32 accumulator and rounded once, to the output type:
// scaling a rounded 16-bit value could overflow fp16 and would round twice. There is no source
// operand and no auxiliary T tensor, both known at compile time, so the epilogue's source path is
// dead code.
#pragma once

#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"

namespace cutlass_moe {
namespace grouped_gemm {

template <typename ElementOutput_, typename ElementScale_, int Count>
class ColumnScaleOutputOp {
 public:
  using ElementOutput = ElementOutput_;
  using ElementC = ElementOutput_;
  using ElementZ = ElementOutput_;
  using ElementT = ElementOutput_;  // unused: T is never stored
  using ElementVector = ElementScale_;
  using ElementAccumulator = float;
  using ElementCompute = float;

  static int const kElementsPerAccess = Count;
  static int const kCount = Count;
  static bool const kIsSingleSource = true;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;
  static bool const kIsHeavy = false;

  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kCount>;
  using FragmentCompute = cutlass::Array<ElementCompute, kCount>;
  using FragmentC = cutlass::Array<ElementC, kCount>;
  using FragmentZ = cutlass::Array<ElementZ, kCount>;
  using FragmentT = cutlass::Array<ElementT, kCount>;

  struct Params {};

  CUTLASS_HOST_DEVICE
  explicit ColumnScaleOutputOp(Params const&) {}

  CUTLASS_HOST_DEVICE
  constexpr bool is_source_needed() const { return false; }

  // Split-K is not used by the grouped kernel; kept for the output-op concept.
  CUTLASS_HOST_DEVICE
  void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& accumulator,
                  FragmentCompute const& scale) const {
    FragmentCompute scaled;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) scaled[i] = accumulator[i] * scale[i];
    cutlass::NumericArrayConverter<ElementZ, ElementCompute, kCount> convert;
    frag_Z = convert(scaled);
  }

  // Source-needed form, required by the epilogue's interface; never reached (no source).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT& frag_T, FragmentAccumulator const& accumulator,
                  FragmentC const&, FragmentCompute const& scale) const {
    (*this)(frag_Z, frag_T, accumulator, scale);
  }
};

}  // namespace grouped_gemm
}  // namespace cutlass_moe
