// Signed count-sketch folds on the CPU, framework-free (float32 in, float32 out).
//
// The torch backend's one extra pass per tracked layer is a fold: every column (projected
// mode) or every element (sketch mode) is added into the bucket its hash names. PyTorch does
// it with index_add_, a scalar scatter whose store-to-load chains and per-element int64 index
// reads cost a few cycles per element. These loops do the same sums in fewer:
//   fold_columns: 8 rows at a time; 8 x 8 tiles are transposed in AVX2 registers so that one
//                 column of the 8 rows is a single vector add into a bucket-major scratch
//                 (a scalar loop on CPUs without AVX2, chosen at run time);
//   fold_flat:    a scalar loop over int32 indices.
// Both are single-threaded on purpose: threads of our own would compete with PyTorch's
// OpenMP workers, which keep spinning after each parallel op (measured: two threads of ours
// gained nothing right after a torch GEMM).
#pragma once

#include <cstdint>

namespace rnb_cpu {

// out[r, idx[j]] += src[r * ld + j] for r < rows, j < k; out is [rows, width] contiguous and
// is overwritten. idx values must lie in [0, width); ld >= k. Each output element is summed
// in column order.
void fold_columns(const float* src, std::int64_t rows, std::int64_t k, std::int64_t ld,
                  const std::int32_t* idx, float* out, std::int64_t width);

// out[idx[i]] += src[i] for i < n, in order; out is [width], overwritten. idx values in
// [0, width).
void fold_flat(const float* src, std::int64_t n, const std::int32_t* idx, float* out,
               std::int64_t width);

}  // namespace rnb_cpu
