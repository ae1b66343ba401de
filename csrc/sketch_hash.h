// Count-sketch hash shared by every backend, bit for bit.
//
// The normative spec is rnb_kernels/ops/sketch_hash.py (module docstring); this is its
// uint32 transcription. It lives in a header of host+device functions so that
// tests/cpp/host_test.cpp can check it against the Python reference on machines without a GPU.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace rnb {

constexpr uint32_t kSketchSeedMul = 0x9E3779B9u;
constexpr uint32_t kSketchLayerMul = 0x85EBCA6Bu;
constexpr uint32_t kSketchRowMul = 0xC2B2AE35u;
constexpr uint32_t kSketchColMul = 0x27D4EB2Fu;

// MurmurHash3 finaliser.
RNB_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Hash of output row i; one per row so the per-element cost is a single fmix32.
RNB_HD uint32_t sketch_row_key(uint32_t seed, uint32_t layer, uint32_t i) {
  return fmix32((seed * kSketchSeedMul) ^ (layer * kSketchLayerMul) ^ (i * kSketchRowMul));
}

RNB_HD uint32_t sketch_hash(uint32_t row_key, uint32_t j) {
  return fmix32(row_key + j * kSketchColMul);
}

// k is the sketch width (>= 1).
RNB_HD uint32_t sketch_bucket(uint32_t h, uint32_t k) { return (h & 0x7FFFFFFFu) % k; }

RNB_HD float sketch_sign(uint32_t h) { return (h >> 31) ? -1.0f : 1.0f; }

}  // namespace rnb
