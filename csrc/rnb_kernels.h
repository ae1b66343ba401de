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

}  // namespace rnb
