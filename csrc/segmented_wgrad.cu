// segmented_wgrad (exact): dW = dyᵀ·x plus acc[d] += the share of each domain d.
//
// The GEMM walk is segmented_gemm.cuh's; the flush adds a finished per-domain tile into the
// fp32 accumulator. Without a row split this CTA is the only writer of its tile of acc[d] for
// every d, so a plain read-modify-write is race-free; with a split several CTAs add to the same
// tile and use atomics.
#include "segmented_gemm.cuh"

namespace rnb {
namespace {

using namespace wg;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    _segmented_wgrad_kernel(const Problem<T> p, float* __restrict__ acc) {
  const int64_t k_in = p.k_in, k_out = p.k_out;
  const bool atomic = p.dw32 != nullptr;
  // Rows of acc start 16-byte aligned when K_in is a multiple of 4 (and acc itself is).
  const bool quads = k_in % 4 == 0 && reinterpret_cast<uintptr_t>(acc) % 16 == 0;
  segmented_tile_walk<T>(p, [&](int64_t d, const typename Mma<T>::Acc(&frag)[kFM][kFN],
                                float* scratch, int64_t row0, int64_t col0) {
    float* tile = acc + d * k_out * k_in;
    for_each_quad<T, 2>(frag, scratch, row0, col0, k_out, k_in,
                        [&](int64_t gi, int64_t gj, const float4& v, int cols) {
                          float* dst = tile + gi * k_in + gj;
                          if (atomic) {
#pragma unroll
                            for (int w = 0; w < 4; ++w) {
                              if (w < cols) atomicAdd(dst + w, quad_at(v, w));
                            }
                          } else if (quads) {
                            // cols == 4 here: K_in is a multiple of 4 and gj of 4.
                            float4 o = *reinterpret_cast<float4*>(dst);
                            o.x += v.x;
                            o.y += v.y;
                            o.z += v.z;
                            o.w += v.w;
                            *reinterpret_cast<float4*>(dst) = o;
                          } else {
#pragma unroll
                            for (int w = 0; w < 4; ++w) {
                              if (w < cols) dst[w] += quad_at(v, w);
                            }
                          }
                        });
  });
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* dy, const int64_t* order,
                         const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                         int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                         float* acc, void* dw, float* workspace, int64_t workspace_len,
                         cudaStream_t stream) {
  return run_segmented(dtype, n, k_in, k_out, dw, workspace, workspace_len, stream,
                       [&](const Plan& pl, float* dw32) {
                         const Problem<T> p = make_problem<T>(x, dy, order, bounds, n, k_in,
                                                              k_out, ldx, ldy, num_domains, pl,
                                                              dw, dw32);
                         const dim3 grid(unsigned(pl.tiles), unsigned(pl.chunks));
                         _segmented_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(p, acc);
                         return cudaGetLastError();
                       });
}

}  // namespace

int64_t segmented_workspace_elems(DType dtype, int64_t n, int64_t k_in, int64_t k_out) {
  return wg::workspace_elems(dtype, n, k_in, k_out);
}

cudaError_t segmented_wgrad_launch(const void* x, const void* dy, const int64_t* order,
                                   const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                                   int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                                   float* acc, void* dw, float* workspace,
                                   int64_t workspace_len, cudaStream_t stream) {
  if (!wg::valid_problem(dtype, n, k_in, k_out, ldx, ldy, num_domains))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                 num_domains, acc, dw, workspace, workspace_len, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                  num_domains, acc, dw, workspace, workspace_len, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                         num_domains, acc, dw, workspace, workspace_len, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rnb
