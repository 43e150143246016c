// Error checks and a device guard shared by the CUDA launchers of vlfast._C.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace vlfast {

// Throws std::runtime_error "<fn>: <what> failed: <CUDA error>" when err is not success.
inline void cuda_check(cudaError_t err, const char* fn, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(fn) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// After a kernel launch: a bad configuration (grid, shared memory) surfaces here.
inline void cuda_check_launch(const char* fn, const char* kernel) {
  cuda_check(cudaGetLastError(), fn, (std::string("launching ") + kernel).c_str());
}

// Makes the device that owns `ptr` current for the scope (vlfast._C carries its own
// static CUDA runtime, so it must not rely on another runtime's notion of the current
// device).  Throws std::invalid_argument when `ptr` is not device memory.
class PointerDeviceGuard {
 public:
  PointerDeviceGuard(const void* ptr, const char* fn, const char* arg) {
    cudaPointerAttributes attr{};
    cuda_check(cudaPointerGetAttributes(&attr, ptr), fn, "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      throw std::invalid_argument(std::string(fn) + ": " + arg +
                                  " is not CUDA device memory (pass a CUDA tensor's data_ptr())");
    }
    device_ = attr.device;
    cuda_check(cudaGetDevice(&prev_), fn, "cudaGetDevice");
    if (attr.device != prev_) {
      cuda_check(cudaSetDevice(attr.device), fn, "cudaSetDevice");
      switched_ = true;
    }
  }
  ~PointerDeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  int device() const { return device_; }
  PointerDeviceGuard(const PointerDeviceGuard&) = delete;
  PointerDeviceGuard& operator=(const PointerDeviceGuard&) = delete;

 private:
  int prev_ = 0;
  int device_ = 0;
  bool switched_ = false;
};

}  // namespace vlfast
