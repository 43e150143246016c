// Dropout keep-mask drivers: out[i] = philox_keep(seed, offset + i, threshold), i in [0, n).
#pragma once

#include <cstdint>

namespace vlfast {

// CPU (OpenMP when built with it). `out` holds n bytes (0 or 1; a torch.bool buffer).
void keep_mask_cpu(uint8_t* out, int64_t n, uint64_t seed, int64_t offset, uint32_t threshold);

#if defined(VLFAST_WITH_CUDA)
// CUDA: `out` is device memory of n bytes; `stream` is a cudaStream_t cast to an
// integer (0 = the legacy default stream).  Runs on the device that owns `out`,
// asynchronously on that stream; throws std::invalid_argument when `out` is not device
// memory and std::runtime_error with CUDA's message when a CUDA call fails.
void keep_mask_cuda(uint8_t* out, int64_t n, uint64_t seed, int64_t offset, uint32_t threshold,
                    uintptr_t stream);

// The CUDA runtime version this module was compiled against (e.g. 13000).
int cuda_runtime_version_compiled();
#endif

}  // namespace vlfast
