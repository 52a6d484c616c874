# Locates CUTLASS's headers for cutlass_moe. Search order:
#   1. CUTLASS_DIR (CMake variable, else environment variable): a CUTLASS checkout or install
#      with include/cutlass/cutlass.h
#   2. third_party/cutlass (a checkout next to this file)
#   3. the installed `nvidia-cutlass` Python package (headers under
#      cutlass_library/source/include), located without importing it
# Sets CUTLASS_INCLUDE_DIR, CUTLASS_VERSION, CUTLASS_SOURCE (which of the three was used) and
# CUTLASS_DUAL_GEMM_DIR: CUTLASS's dual-GEMM building blocks (examples/45_dual_gemm: a mainloop
# that multiplies one A tile by two B tiles, and its two-accumulator epilogue), which the fused
# gated GEMM1 tactics are built on. Source checkouts and the nvidia-cutlass package ship them; a
# headers-only install does not.

set(_cutlass_candidates "")
set(_cutlass_tried "")

if(NOT CUTLASS_DIR AND DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_DIR "$ENV{CUTLASS_DIR}")
endif()
if(CUTLASS_DIR)
  list(APPEND _cutlass_candidates "CUTLASS_DIR|${CUTLASS_DIR}/include")
  list(APPEND _cutlass_tried "  1. CUTLASS_DIR=${CUTLASS_DIR} (no include/cutlass/cutlass.h there)")
else()
  list(APPEND _cutlass_tried "  1. CUTLASS_DIR (CMake variable or environment variable): not set")
endif()

list(APPEND _cutlass_candidates "third_party/cutlass|${CMAKE_CURRENT_LIST_DIR}/cutlass/include")
list(APPEND _cutlass_tried "  2. ${CMAKE_CURRENT_LIST_DIR}/cutlass: no checkout there")

# find_spec() on a top-level name locates the package without executing it.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import importlib.util as u; s = u.find_spec('cutlass_library'); print(list(s.submodule_search_locations)[0] if s else '')"
  OUTPUT_VARIABLE _cutlass_pkg_dir
  OUTPUT_STRIP_TRAILING_WHITESPACE
  ERROR_QUIET)
if(_cutlass_pkg_dir)
  list(APPEND _cutlass_candidates "nvidia-cutlass|${_cutlass_pkg_dir}/source/include")
  list(APPEND _cutlass_tried "  3. nvidia-cutlass package at ${_cutlass_pkg_dir}: no source/include/cutlass/cutlass.h")
else()
  list(APPEND _cutlass_tried "  3. the nvidia-cutlass Python package: not installed for ${Python_EXECUTABLE}")
endif()

set(CUTLASS_INCLUDE_DIR "")
foreach(_candidate IN LISTS _cutlass_candidates)
  string(REPLACE "|" ";" _pair "${_candidate}")
  list(GET _pair 0 _source)
  list(GET _pair 1 _dir)
  if(EXISTS "${_dir}/cutlass/cutlass.h")
    set(CUTLASS_INCLUDE_DIR "${_dir}")
    set(CUTLASS_SOURCE "${_source}")
    break()
  endif()
endforeach()

if(NOT CUTLASS_INCLUDE_DIR)
  string(REPLACE ";" "\n" _tried "${_cutlass_tried}")
  message(FATAL_ERROR
    "cutlass_moe: CUTLASS headers not found. Looked in, in order:\n${_tried}\n"
    "Fix one of them: pass -DCUTLASS_DIR=/path/to/cutlass (or set the CUTLASS_DIR environment "
    "variable), clone CUTLASS into third_party/cutlass, or `pip install nvidia-cutlass`.")
endif()

file(STRINGS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h" _cutlass_version_lines
     REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
foreach(_part MAJOR MINOR PATCH)
  string(REGEX MATCH "CUTLASS_${_part} ([0-9]+)" _m "${_cutlass_version_lines}")
  set(_cutlass_${_part} "${CMAKE_MATCH_1}")
endforeach()
set(CUTLASS_VERSION "${_cutlass_MAJOR}.${_cutlass_MINOR}.${_cutlass_PATCH}")
message(STATUS "cutlass_moe: CUTLASS ${CUTLASS_VERSION} from ${CUTLASS_SOURCE}: ${CUTLASS_INCLUDE_DIR}")

get_filename_component(CUTLASS_DUAL_GEMM_DIR "${CUTLASS_INCLUDE_DIR}/../examples/45_dual_gemm"
                       ABSOLUTE)
if(NOT EXISTS "${CUTLASS_DUAL_GEMM_DIR}/threadblock/dual_mma_multistage.h" OR
   NOT EXISTS "${CUTLASS_DUAL_GEMM_DIR}/threadblock/dual_epilogue.h")
  message(FATAL_ERROR
    "cutlass_moe: CUTLASS at ${CUTLASS_INCLUDE_DIR} lacks examples/45_dual_gemm/threadblock "
    "(dual_mma_multistage.h, dual_epilogue.h), which the fused gated GEMM1 kernels use. Point "
    "CUTLASS_DIR at a CUTLASS source checkout (not a headers-only install), or use the "
    "nvidia-cutlass package.")
endif()
