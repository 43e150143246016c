// Shared macros for vlfast's torch-free C++/CUDA sources.
#pragma once

#include <cstdint>

// VLFAST_HD marks functions compiled for both the host and the device: the CPU
// drivers (.cpp, built by the host compiler) and the CUDA kernels (.cu, built by
// nvcc) call the very same math, so the CPU tests exercise the GPU code path.
#if defined(__CUDACC__)
#define VLFAST_HD __host__ __device__
#define VLFAST_DEVICE_INLINE __device__ __forceinline__
#else
#define VLFAST_HD
#define VLFAST_DEVICE_INLINE inline
#endif

#define VLFAST_STRINGIFY_(x) #x
#define VLFAST_STRINGIFY(x) VLFAST_STRINGIFY_(x)
