// Host half of csrc/common/cuda_info.h: built into vlfast._C with and without CUDA.
#include "common/cuda_info.h"

#include <cctype>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

namespace vlfast {

namespace {

// "535.104.05", "580.65.06", "550.54": digits and dots, starting with a digit, with a dot.
bool is_release_token(const std::string& tok) {
  if (tok.empty() || !std::isdigit(static_cast<unsigned char>(tok[0]))) return false;
  bool dot = false;
  for (const char c : tok) {
    if (c == '.') {
      dot = true;
    } else if (!std::isdigit(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return dot;
}

// First line of /proc/driver/nvidia/version, e.g.
//   NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023
//   NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (...)
bool release_from_proc(std::string* release) {
  std::ifstream f("/proc/driver/nvidia/version");
  std::string line;
  if (!f || !std::getline(f, line)) return false;
  std::istringstream words(line);
  std::string tok;
  while (words >> tok) {
    if (is_release_token(tok)) {
      *release = tok;
      return true;
    }
  }
  return false;
}

#if !defined(_WIN32)
// dlopen'd once and never closed: the libraries stay loaded for the process, as they
// would after any CUDA use, and closing libcuda under another user of it is unsafe.
void* open_library(const char* name) { return dlopen(name, RTLD_LAZY | RTLD_LOCAL); }
#endif

// nvmlSystemGetDriverVersion through a dlopen'd libnvidia-ml (WSL has no /proc entry).
bool release_from_nvml(std::string* release) {
#if defined(_WIN32)
  (void)release;
  return false;
#else
  static void* const lib = open_library("libnvidia-ml.so.1");
  if (lib == nullptr) return false;
  using init_fn = int (*)();
  using version_fn = int (*)(char*, unsigned int);
  using shutdown_fn = int (*)();
  const auto init = reinterpret_cast<init_fn>(dlsym(lib, "nvmlInit_v2"));
  const auto get = reinterpret_cast<version_fn>(dlsym(lib, "nvmlSystemGetDriverVersion"));
  const auto shutdown = reinterpret_cast<shutdown_fn>(dlsym(lib, "nvmlShutdown"));
  if (init == nullptr || get == nullptr || shutdown == nullptr) return false;
  if (init() != 0) return false;  // NVML_SUCCESS == 0
  char buf[96] = {0};             // NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE is 80
  const bool ok = get(buf, sizeof(buf) - 1) == 0 && buf[0] != '\0';
  shutdown();
  if (ok) *release = buf;
  return ok;
#endif
}

#if !defined(VLFAST_WITH_CUDA)
// Without a CUDA runtime: cuDriverGetVersion of a dlopen'd libcuda (works before cuInit).
int driver_version_libcuda() {
#if defined(_WIN32)
  throw std::runtime_error("cuda_driver_version: not supported on Windows in a build without CUDA");
#else
  static void* const lib = open_library("libcuda.so.1");
  if (lib == nullptr) return 0;  // no driver installed
  using get_fn = int (*)(int*);
  const auto get = reinterpret_cast<get_fn>(dlsym(lib, "cuDriverGetVersion"));
  if (get == nullptr) throw std::runtime_error("cuda_driver_version: libcuda.so.1 has no cuDriverGetVersion");
  int version = 0;
  const int rc = get(&version);
  if (rc != 0) throw std::runtime_error("cuDriverGetVersion failed with CUresult " + std::to_string(rc));
  return version;
#endif
}
#endif

}  // namespace

int cuda_runtime_version_built() {
#if defined(VLFAST_WITH_CUDA)
  return cuda_runtime_version_cudart();
#else
  return 0;
#endif
}

int cuda_driver_version() {
#if defined(VLFAST_WITH_CUDA)
  return cuda_driver_version_cudart();
#else
  return driver_version_libcuda();
#endif
}

bool nvidia_driver_release(std::string* release, std::string* source) {
  if (release_from_proc(release)) {
    *source = "/proc/driver/nvidia/version";
    return true;
  }
  if (release_from_nvml(release)) {
    *source = "nvml";
    return true;
  }
  return false;
}

}  // namespace vlfast
