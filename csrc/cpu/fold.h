// Signed count-sketch folds on the CPU, framework-free (float32 in, float32 out).
//
// The torch backend's one extra pass per tracked layer is a fold: every column (projected
// mode) or every element (sketch mode) is added into the bucket its hash names. PyTorch does
// it with index_add_, a scalar scatter whose store-to-load chains and per-element int64 index
// reads cost a few cycles per element. These loops do the same sums in fewer:
//   fold_columns: 8 rows at a time; 8 x 8 tiles are transposed in AVX2 registers so that one
//                 column of the 8 rows is a single vector add (or multiply-add by its sign)
//                 into a bucket-major scratch (a scalar loop on CPUs without AVX2, chosen at
//                 run time). Blocks of rows are shared among `threads` OpenMP threads.
//   fold_flat:    a scalar loop over int32 indices; large inputs are cut into a few chunks
//                 folded into partial sums of their own (on `threads` threads), then added.
// Both only use threads when the caller asks for them: the Python side does so when
// this library's OpenMP runtime is PyTorch's own (the loader shares one libgomp.so.1), so the
// work goes to PyTorch's workers, which spin between parallel ops. Threads of a second
// runtime would compete with those spinning workers for the cores (measured: two threads of
// ours gained nothing right after a torch GEMM).
#pragma once

#include <cstdint>

namespace rnb_cpu {

// For r < rows, with out's rows out_ld floats apart (out_ld >= width + n_keep):
//   out[r, idx[j]] += s_j * src[r * ld + j]   for j < k, s_j = sign[j] (1 when sign is null);
//   out[r, width + q] = src[r * ld + keep[q]] for q < n_keep (columns kept as they are).
// out's first width + n_keep columns are overwritten. idx values in [0, width), keep values
// in [0, k), ld >= k. Each bucket is summed in column order, whatever the thread count, so the
// result does not depend on `threads`.
void fold_columns(const float* src, std::int64_t rows, std::int64_t k, std::int64_t ld,
                  const std::int32_t* idx, const float* sign, std::int64_t width,
                  const std::int32_t* keep, std::int64_t n_keep, float* out,
                  std::int64_t out_ld, int threads);

// out[idx[i]] += src[i] for i < n; out is [width], overwritten. idx values in [0, width).
// Below 2^19 elements (or when the partial sums would be large) in element order; above, the
// elements are cut into 2-8 equal chunks, each summed in order, and the chunks' sums added in
// chunk order. The chunks depend on n and width only, so the result does not depend on
// `threads`.
void fold_flat(const float* src, std::int64_t n, const std::int32_t* idx, float* out,
               std::int64_t width, int threads);

// Address of omp_get_max_threads in the OpenMP runtime this library was linked to (0 when
// built without OpenMP): equal to the one PyTorch resolves iff both share one runtime.
std::uintptr_t openmp_symbol();

}  // namespace rnb_cpu
