// The CUDA-runtime half of csrc/common/cuda_info.h (compiled only when building with CUDA).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_info.h"

namespace vlfast {

int cuda_runtime_version_cudart() { return CUDART_VERSION; }

int cuda_driver_version_cudart() {
  // Documented to return 0 (with cudaSuccess) when no driver is installed; it queries the
  // driver's version only, without initialising the runtime's context.
  int version = 0;
  const cudaError_t err = cudaDriverGetVersion(&version);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cudaDriverGetVersion failed: ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
  return version;
}

}  // namespace vlfast
