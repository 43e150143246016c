// Which CUDA runtime vlfast._C carries and what the machine's NVIDIA driver supports.
//
// None of these functions creates a CUDA context: the driver's CUDA version comes from
// cudaDriverGetVersion (cuDriverGetVersion through dlopen in a build without CUDA),
// which only asks the installed libcuda; the driver's release comes from
// /proc/driver/nvidia/version or, failing that, NVML opened with dlopen (never a link
// dependency, so the module imports on machines with no driver).
#pragma once

#include <string>

namespace vlfast {

// CUDART_VERSION of the CUDA runtime compiled into this module (e.g. 13000 for 13.0);
// 0 when the module was built without CUDA.
int cuda_runtime_version_built();

// The newest CUDA version the installed driver supports, as 1000 * major + 10 * minor
// (e.g. 12020 for a driver that supports CUDA 12.2); 0 when no driver is installed.
// Throws std::runtime_error when the query itself fails.
int cuda_driver_version();

// The NVIDIA kernel driver's release (e.g. "535.104.05") in *release and where it was
// read ("/proc/driver/nvidia/version" or "nvml") in *source; false when unknown.
bool nvidia_driver_release(std::string* release, std::string* source);

#if defined(VLFAST_WITH_CUDA)
// CUDART_VERSION and cudaDriverGetVersion of the static runtime linked into this module
// (csrc/common/cuda_info.cu).
int cuda_runtime_version_cudart();
int cuda_driver_version_cudart();
#endif

}  // namespace vlfast
