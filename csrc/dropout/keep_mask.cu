// CUDA kernel of the dropout keep mask: out[i] = philox_keep(seed, offset + i, threshold).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "keep_mask.h"
#include "philox.cuh"

namespace vlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // one 32-bit store of 4 mask bytes per thread and step

// Aligned output: each thread writes 4 consecutive bytes with one 32-bit store.
__global__ void keep_mask_vec4_kernel(uint32_t* __restrict__ out, int64_t n_vec, uint64_t seed,
                                      uint64_t base, uint32_t threshold) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const uint64_t c = base + static_cast<uint64_t>(v) * kPerThread;
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      word |= static_cast<uint32_t>(philox_keep(seed, c + j, threshold)) << (8 * j);  // little endian
    }
    out[v] = word;
  }
}

// Any alignment / the tail: one byte per thread and step.
__global__ void keep_mask_scalar_kernel(uint8_t* __restrict__ out, int64_t n, uint64_t seed,
                                        uint64_t base, uint32_t threshold) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = philox_keep(seed, base + static_cast<uint64_t>(i), threshold) ? 1 : 0;
  }
}

unsigned int grid_for(int64_t work) {
  // Enough blocks to fill any current GPU several times over; the kernels are grid-stride.
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

constexpr const char* kFn = "vlfast._C.keep_mask_cuda";

}  // namespace

void keep_mask_cuda(uint8_t* out, int64_t n, uint64_t seed, int64_t offset, uint32_t threshold,
                    uintptr_t stream_handle) {
  if (n <= 0) return;
  PointerDeviceGuard device_guard(out, kFn, "out_ptr");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const uint64_t base = static_cast<uint64_t>(offset);
  int64_t head = 0;
  if (reinterpret_cast<uintptr_t>(out) % sizeof(uint32_t) == 0) {
    const int64_t n_vec = n / kPerThread;
    if (n_vec > 0) {
      keep_mask_vec4_kernel<<<grid_for(n_vec), kThreads, 0, stream>>>(reinterpret_cast<uint32_t*>(out), n_vec,
                                                                      seed, base, threshold);
      cuda_check_launch(kFn, "keep_mask_vec4_kernel");
      head = n_vec * kPerThread;
    }
  }
  const int64_t rest = n - head;
  if (rest > 0) {
    keep_mask_scalar_kernel<<<grid_for(rest), kThreads, 0, stream>>>(out + head, rest, seed,
                                                                     base + static_cast<uint64_t>(head), threshold);
    cuda_check_launch(kFn, "keep_mask_scalar_kernel");
  }
}

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

}  // namespace vlfast
