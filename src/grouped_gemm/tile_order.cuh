// Which output tile of a grouped-GEMM problem each of its tile indices computes.
//
// CUTLASS's grouped kernels walk a problem's tiles row band by row band (N fastest): the tiles
// running at one time share an A row band and take different weight column bands, and a weight
// band is needed again only a whole row band of tiles later. For an expert with several row bands
// (prefill) that is hundreds of MB of weights later, long after the band has left L2, so the
// weights stream from DRAM once per row band: Mixtral's GEMM1 at 512 rows per expert read them 4
// times.
//
// Here the tile indices walk groups of G row bands column by column (M fastest inside a group):
// the G tiles that share a weight column band run together, so the band streams from DRAM once
// per group, while the group's A rows (G * TileM * K elements) are reused from L2 by every column.
// G is the number of row bands whose A rows fit in kTileGroupBytes (cutlass_moe/tactic.h: 16 MiB,
// a third of the 40-50 MB L2 of A100 and H100), at least 1 and at most the problem's row bands.
// A problem with one row band (decode) keeps CUTLASS's order.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm_coord.h"
#include "cutlass/matrix_coord.h"
#include "cutlass_moe/tactic.h"

namespace cutlass_moe {
namespace grouped_gemm {

// Row and column offset of tile `tile` (0 <= tile < grid.m() * grid.n()) of a problem of size
// `problem` cut into `grid` tiles of TileM x TileN, whose A operand has `a_element_bytes` bytes per
// element. A bijection from tile indices onto the tiles.
template <int TileM, int TileN>
CUTLASS_HOST_DEVICE cutlass::MatrixCoord grouped_tile_offset(cutlass::gemm::GemmCoord problem,
                                                             cutlass::gemm::GemmCoord grid,
                                                             int tile, int a_element_bytes) {
  const int64_t band_bytes = int64_t(TileM) * problem.k() * a_element_bytes;
  int64_t group = band_bytes > 0 ? kTileGroupBytes / band_bytes : 1;
  group = group < 1 ? 1 : (group > grid.m() ? grid.m() : group);
  const int tiles_per_group = int(group) * grid.n();
  const int first_band = (tile / tiles_per_group) * int(group);
  const int bands = grid.m() - first_band < group ? grid.m() - first_band : int(group);
  const int in_group = tile % tiles_per_group;
  return cutlass::MatrixCoord((first_band + in_group % bands) * TileM, (in_group / bands) * TileN);
}

}  // namespace grouped_gemm
}  // namespace cutlass_moe
