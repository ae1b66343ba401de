// segmented_wgrad (sketch): dW = dyᵀ·x plus a count-sketch of each domain's share.
//
// Same GEMM walk as the exact kernel (segmented_gemm.cuh); a finished per-domain tile is folded
// into sketch[d] element by element: (i, j) goes to bucket(i, j) with sign(i, j) from the
// seeded hash of sketch_hash.h. Buckets collide across elements and CTAs, so the fold is
// atomic; exact zeros (padding, empty rows) are skipped because they cannot change a sum.
#include "segmented_gemm.cuh"
#include "sketch_hash.h"

namespace rnb {
namespace {

using namespace wg;

struct SketchArgs {
  float* sketch;  // [num_domains, k] fp32 contiguous
  uint32_t k;     // buckets, >= 1
  uint32_t seed;
  uint32_t layer;
  uint32_t row_offset;  // global index of row 0 (row-sharded weights)
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    _domain_sketch_kernel(const Problem<T> p, const SketchArgs s) {
  const int64_t k_in = p.k_in, k_out = p.k_out;
  segmented_tile_walk<T>(p, [&](int64_t d, const typename Mma<T>::Acc(&frag)[kFM][kFN],
                                float* scratch, int64_t row0, int64_t col0) {
    float* row = s.sketch + d * int64_t(s.k);
    for_each_quad<T, 1>(frag, scratch, row0, col0, k_out, k_in,
                        [&](int64_t gi, int64_t gj, const float4& v, int cols) {
                          const uint32_t key = sketch_row_key(s.seed, s.layer, uint32_t(gi) + s.row_offset);
#pragma unroll
                          for (int w = 0; w < 4; ++w) {
                            const float x = quad_at(v, w);
                            if (w >= cols || x == 0.f) continue;
                            const uint32_t h = sketch_hash(key, uint32_t(gj + w));
                            atomicAdd(row + sketch_bucket(h, s.k), sketch_sign(h) * x);
                          }
                        });
  });
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* dy, const int64_t* order,
                         const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                         int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                         const SketchArgs& s, void* dw, float* workspace, int64_t workspace_len,
                         cudaStream_t stream) {
  return run_segmented(dtype, n, k_in, k_out, dw, workspace, workspace_len, stream,
                       [&](const Plan& pl, float* dw32) {
                         const Problem<T> p = make_problem<T>(x, dy, order, bounds, n, k_in,
                                                              k_out, ldx, ldy, num_domains, pl,
                                                              dw, dw32);
                         const dim3 grid(unsigned(pl.tiles), unsigned(pl.chunks));
                         _domain_sketch_kernel<T><<<grid, kThreads, 0, stream>>>(p, s);
                         return cudaGetLastError();
                       });
}

}  // namespace

cudaError_t domain_sketch_launch(const void* x, const void* dy, const int64_t* order,
                                 const int64_t* bounds, DType dtype, int64_t n, int64_t k_in,
                                 int64_t k_out, int64_t ldx, int64_t ldy, int64_t num_domains,
                                 float* sketch, int64_t sketch_dim, uint32_t seed,
                                 uint32_t layer, uint32_t row_offset, void* dw, float* workspace,
                                 int64_t workspace_len, cudaStream_t stream) {
  // The hash indexes rows and columns as uint32 and buckets with a uint32 modulus.
  const int64_t u32 = int64_t(0xFFFFFFFFu);
  if (!wg::valid_problem(dtype, n, k_in, k_out, ldx, ldy, num_domains) || sketch_dim < 1 ||
      sketch_dim > u32 || k_in > u32 || k_out > u32 || int64_t(row_offset) + k_out > u32 + 1)
    return cudaErrorInvalidValue;
  const SketchArgs s{sketch, uint32_t(sketch_dim), seed, layer, row_offset};
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                 num_domains, s, dw, workspace, workspace_len, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                  num_domains, s, dw, workspace, workspace_len, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, dy, order, bounds, dtype, n, k_in, k_out, ldx, ldy,
                                         num_domains, s, dw, workspace, workspace_len, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rnb
