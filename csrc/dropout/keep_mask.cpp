// CPU driver of the dropout keep mask: the same philox_keep as the CUDA kernel.
#include "keep_mask.h"

#include "philox.cuh"

namespace vlfast {

void keep_mask_cpu(uint8_t* out, int64_t n, uint64_t seed, int64_t offset, uint32_t threshold) {
  const uint64_t base = static_cast<uint64_t>(offset);
#if defined(VLFAST_WITH_OPENMP)
#pragma omp parallel for simd schedule(static) if (n >= (int64_t{1} << 15))
#endif
  for (int64_t i = 0; i < n; ++i) {
    out[i] = philox_keep(seed, base + static_cast<uint64_t>(i), threshold) ? 1 : 0;
  }
}

}  // namespace vlfast
