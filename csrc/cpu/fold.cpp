#include "fold.h"

#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNB_CPU_X86 1
#include <immintrin.h>
#endif

namespace rnb_cpu {
namespace {

// Rows folded together: one index read serves 8 rows, and a column's 8 adds hit one 32-byte
// line of the bucket-major scratch (one AVX2 register).
constexpr std::int64_t kRowBlock = 8;

// Rows [r0, r0 + rows) one at a time: the remainder of the blocked loops, and every row on
// CPUs without AVX2.
void fold_rows_scalar(const float* src, std::int64_t r0, std::int64_t r1, std::int64_t k,
                      std::int64_t ld, const std::int32_t* idx, float* out,
                      std::int64_t width) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* s = src + r * ld;
    float* o = out + r * width;
    std::memset(o, 0, sizeof(float) * static_cast<std::size_t>(width));
    for (std::int64_t j = 0; j < k; ++j) o[idx[j]] += s[j];
  }
}

#ifdef RNB_CPU_X86
// In-register transpose of an 8 x 8 float block held in r[0..7].
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Blocks of 8 rows: 8 x 8 tiles of src are transposed in registers, so column j of the block
// is one register added to bucket idx[j] of a [width][8] scratch; the scratch is transposed
// back into the 8 output rows at the end of the block.
__attribute__((target("avx2"))) void fold_columns_avx2(const float* src, std::int64_t rows,
                                                       std::int64_t k, std::int64_t ld,
                                                       const std::int32_t* idx, float* out,
                                                       std::int64_t width) {
  const std::int64_t wpad = (width + 7) / 8 * 8;
  std::vector<float> scratch(static_cast<std::size_t>(wpad * kRowBlock + 8));
  // 32-byte aligned start for the aligned loads and stores below.
  float* acc = scratch.data() + ((32 - reinterpret_cast<std::uintptr_t>(scratch.data()) % 32) %
                                 32) / sizeof(float);
  const std::int64_t kv = k / 8 * 8;
  std::int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(wpad * kRowBlock));
    const float* s = src + r * ld;
    __m256 v[8];
    for (std::int64_t j = 0; j < kv; j += 8) {
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(s + i * ld + j);
      transpose8(v);  // v[c] = column j + c of the 8 rows
      for (int c = 0; c < 8; ++c) {
        float* a = acc + static_cast<std::int64_t>(idx[j + c]) * kRowBlock;
        _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), v[c]));
      }
    }
    for (std::int64_t j = kv; j < k; ++j) {
      float* a = acc + static_cast<std::int64_t>(idx[j]) * kRowBlock;
      for (int i = 0; i < 8; ++i) a[i] += s[i * ld + j];
    }
    // acc is [wpad][8]: transpose 8 buckets at a time into the 8 output rows.
    float* o = out + r * width;
    const std::int64_t wv = width / 8 * 8;
    for (std::int64_t b = 0; b < wv; b += 8) {
      for (int i = 0; i < 8; ++i) v[i] = _mm256_load_ps(acc + (b + i) * kRowBlock);
      transpose8(v);  // v[i] = buckets b..b+7 of row i
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + i * width + b, v[i]);
    }
    for (std::int64_t b = wv; b < width; ++b)
      for (int i = 0; i < 8; ++i) o[i * width + b] = acc[b * kRowBlock + i];
  }
  fold_rows_scalar(src, r, rows, k, ld, idx, out, width);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

}  // namespace

void fold_columns(const float* src, std::int64_t rows, std::int64_t k, std::int64_t ld,
                  const std::int32_t* idx, float* out, std::int64_t width) {
  if (rows <= 0 || width <= 0) return;
#ifdef RNB_CPU_X86
  if (has_avx2()) {
    fold_columns_avx2(src, rows, k, ld, idx, out, width);
    return;
  }
#endif
  fold_rows_scalar(src, 0, rows, k, ld, idx, out, width);
}

void fold_flat(const float* src, std::int64_t n, const std::int32_t* idx, float* out,
               std::int64_t width) {
  if (width > 0) std::memset(out, 0, sizeof(float) * static_cast<std::size_t>(width));
  for (std::int64_t i = 0; i < n; ++i) out[idx[i]] += src[i];
}

}  // namespace rnb_cpu
