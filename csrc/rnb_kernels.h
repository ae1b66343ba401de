// Framework-free entry points of the rnb_kernels CUDA kernels.
//
// Only cuda_runtime is used: the Python side passes raw device pointers, shapes, strides and
// the current stream, so this code builds with nvcc alone (no torch headers) and the compiled
// module imports on machines without a GPU.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace rnb {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[m, r] (float64, row-major, fully overwritten) = A[m, P] · B[r, P]ᵀ.
// A and B have unit column stride and row strides lda / ldb (in elements). When `symmetric`
// is set, B must be A (r == m) and only tiles on or above the diagonal are computed; entries
// strictly below the diagonal of `out` are then left at zero for the caller to mirror.
// Returns the first CUDA error met (cudaSuccess if none).
cudaError_t gram_launch(const void* a, const void* b, DType dtype, int64_t m, int64_t r,
                        int64_t p, int64_t lda, int64_t ldb, bool symmetric, double* out,
                        cudaStream_t stream);

// Segmented weight gradient of y = x·Wᵀ over rows grouped by domain.
//
// x [n, k_in] and dy [n, k_out] have unit column stride and row strides ldx / ldy (elements).
// `order` (int64 [n], device) lists the rows sorted by domain with the ignored (-1) rows first,
// and `bounds` (int64 [num_domains + 2], device) the segment offsets into that order: rows of
// domain d are order[bounds[d + 1] .. bounds[d + 2]), bounds[0] = 0, bounds[num_domains + 1] = n.
// dw [k_out, k_in] (dtype, contiguous) is overwritten with dyᵀ·x over all rows.
//
// When the launch splits the rows across CTAs (small layers) and dtype is not float32, dW is
// summed in an fp32 `workspace` of at least segmented_workspace_elems(...) floats; pass null /
// 0 when that returns 0. Both calls must see the same current device.
int64_t segmented_workspace_elems(DType dtype, int64_t n, int64_t k_in, int64_t k_out);

// Exact mode: acc (fp32 [num_domains, k_out, k_in], contiguous) += each domain's dyᵀ·x.
// Domains without rows are not touched. Returns the first CUDA error met; invalid arguments
// give cudaErrorInvalidValue before any CUDA call.
cudaError_t segmented_wgrad_launch(const void* x, const void* dy, const int64_t* order,
                                   const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                                   int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                                   float* acc, void* dw, float* workspace,
                                   int64_t workspace_len, cudaStream_t stream);

// Sketch mode: sketch (fp32 [num_domains, sketch_dim], contiguous) row d += the count-sketch of
// domain d's dyᵀ·x under the (seed, layer) hash of sketch_hash.h. Row i is hashed as global row
// row_offset + i (a row shard of a larger weight), so shards' sketches add up.
cudaError_t domain_sketch_launch(const void* x, const void* dy, const int64_t* order,
                                 const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                                 int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                                 float* sketch, int64_t sketch_dim, uint32_t seed,
                                 uint32_t layer, uint32_t row_offset, void* dw, float* workspace,
                                 int64_t workspace_len, cudaStream_t stream);

}  // namespace rnb
