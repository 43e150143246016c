// Counter-based RNG shared by every dropout in vlfast (CPU and CUDA).
//
// philox_u32(seed, counter) is the first output word of Philox4x32-10 with
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (counter & 0xffffffff, counter >> 32, 0, 0)
// which is bit-for-bit what Triton's `tl.randint(seed, offset)` returns for an
// int64 `offset` (triton/language/random.py: randint -> randint4x -> philox).
//
// Dropout keeps element i (counter = offset + i) iff the top 24 bits of
// philox_u32 are >= threshold, threshold = min(2^24, round(p * 2^24)); the keep
// probability is 1 - threshold / 2^24.
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace vlfast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr uint32_t kDropoutThresholdMax = 1u << 24;  // threshold == 2^24 keeps nothing

VLFAST_HD inline uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// First 32-bit output word of Philox4x32-10 for counter (lo, hi, 0, 0) and key (seed lo, seed hi).
VLFAST_HD inline uint32_t philox_u32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t _c0 = c0;
    const uint32_t _c2 = c2;
    c0 = philox_mulhi(kPhiloxRoundB, _c2) ^ c1 ^ k0;
    c2 = philox_mulhi(kPhiloxRoundA, _c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * _c2;
    c3 = kPhiloxRoundA * _c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// True when the element with this counter survives dropout with the given threshold.
VLFAST_HD inline bool philox_keep(uint64_t seed, uint64_t counter, uint32_t threshold) {
  return (philox_u32(seed, counter) >> 8) >= threshold;
}

}  // namespace vlfast
