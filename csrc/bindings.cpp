// vlfast._C: the torch-free C++/CUDA kernels of vlfast.
//
// Python passes raw pointers (tensor.data_ptr()) and CUDA streams
// (torch.cuda.current_stream().cuda_stream) as integers; every function validates
// its scalar arguments and raises ValueError (std::invalid_argument) on bad ones.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_info.h"
#include "dropout/keep_mask.h"
#include "dropout/philox.cuh"
#include "ot/ot.h"

namespace py = pybind11;

namespace {

#ifndef VLFAST_BUILD_TYPE
#define VLFAST_BUILD_TYPE "unknown"
#endif
#ifndef VLFAST_CUDA_ARCHS_STR
#define VLFAST_CUDA_ARCHS_STR ""
#endif
#ifndef VLFAST_CUDA_COMPILER_VERSION
#define VLFAST_CUDA_COMPILER_VERSION ""
#endif

std::string compiler_string() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + VLFAST_STRINGIFY(__GNUC__) "." VLFAST_STRINGIFY(__GNUC_MINOR__) "." VLFAST_STRINGIFY(
             __GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return std::string("msvc ") + VLFAST_STRINGIFY(_MSC_VER);
#else
  return "unknown";
#endif
}

std::string cxx_standard() {
  switch (__cplusplus) {
    case 201703L: return "C++17";
    case 202002L: return "C++20";
    case 202302L: return "C++23";
    default: return "C++ (__cplusplus=" + std::to_string(static_cast<long long>(__cplusplus)) + ")";
  }
}

[[noreturn]] void bad_arg(const std::string& msg) { throw std::invalid_argument(msg); }

uint64_t to_seed(const py::int_& seed, const char* fn) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(seed.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    bad_arg(std::string(fn) + ": seed must be an integer in [0, 2**64), got " + py::repr(seed).cast<std::string>());
  }
  return static_cast<uint64_t>(v);
}

// Shared checks of the keep-mask drivers; returns the threshold as uint32.
uint32_t check_keep_mask_args(const char* fn, uintptr_t out_ptr, int64_t n, int64_t offset, int64_t threshold) {
  if (n < 0) bad_arg(std::string(fn) + ": n must be >= 0, got " + std::to_string(n));
  if (offset < 0) bad_arg(std::string(fn) + ": offset must be >= 0, got " + std::to_string(offset));
  if (n > 0 && n - 1 > INT64_MAX - offset)
    bad_arg(std::string(fn) + ": offset + n must be <= 2**63 (counters are int64), got offset=" +
            std::to_string(offset) + ", n=" + std::to_string(n));
  if (threshold < 0 || threshold > static_cast<int64_t>(vlfast::kDropoutThresholdMax))
    bad_arg(std::string(fn) + ": threshold must be in [0, 2**24], got " + std::to_string(threshold));
  if (n > 0 && out_ptr == 0) bad_arg(std::string(fn) + ": out_ptr is null but n=" + std::to_string(n));
  return static_cast<uint32_t>(threshold);
}

// Shared checks of the OT drivers.
void check_ot_args(const char* fn, uintptr_t cost, uintptr_t xm, uintptr_t ym, uintptr_t plan, int64_t B, int64_t Lx,
                   int64_t Ly, int n_iters) {
  if (B < 0 || Lx < 0 || Ly < 0)
    bad_arg(std::string(fn) + ": B, Lx, Ly must be >= 0, got " + std::to_string(B) + ", " + std::to_string(Lx) +
            ", " + std::to_string(Ly));
  if (Lx > INT32_MAX || Ly > INT32_MAX)
    bad_arg(std::string(fn) + ": Lx and Ly must be < 2**31, got " + std::to_string(Lx) + ", " + std::to_string(Ly));
  if (n_iters < 0) bad_arg(std::string(fn) + ": n_iters must be >= 0, got " + std::to_string(n_iters));
  if (B * Lx * Ly > 0 && (cost == 0 || xm == 0 || ym == 0 || plan == 0))
    bad_arg(std::string(fn) + ": a data pointer is null for a non-empty problem");
}

void check_positive(const char* fn, const char* name, double v) {
  if (!(v > 0.0) || !std::isfinite(v))
    bad_arg(std::string(fn) + ": " + name + " must be a finite float > 0, got " + std::to_string(v));
}

void check_log_mode(const char* fn, int log_mode) {
  if (log_mode < -1 || log_mode > 1)
    bad_arg(std::string(fn) + ": log_mode must be -1 (auto), 0 or 1, got " + std::to_string(log_mode));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlfast's torch-free C++/CUDA kernels (raw pointers and CUDA streams passed as integers).";

  m.def(
      "has_cuda",
      []() {
#if defined(VLFAST_WITH_CUDA)
        return true;
#else
        return false;
#endif
      },
      "True when this module was compiled with its CUDA kernels (nvcc at build time).");

  m.def(
      "cuda_runtime_version", []() { return vlfast::cuda_runtime_version_built(); },
      "CUDART_VERSION of the CUDA runtime compiled into this module (1000 * major + 10 * minor, e.g. 13000); "
      "0 when it was built without CUDA.");

  m.def(
      "cuda_driver_version",
      []() {
        py::gil_scoped_release release;
        return vlfast::cuda_driver_version();
      },
      "The newest CUDA version the installed NVIDIA driver supports (cudaDriverGetVersion; cuDriverGetVersion of "
      "a dlopen'd libcuda in a build without CUDA), 1000 * major + 10 * minor (e.g. 12020); 0 when no driver is "
      "installed. Creates no CUDA context. Raises RuntimeError when the query fails.");

  m.def(
      "nvidia_driver_release",
      []() -> py::object {
        std::string release, source;
        bool found = false;
        {
          py::gil_scoped_release unlocked;
          found = vlfast::nvidia_driver_release(&release, &source);
        }
        if (!found) return py::none();
        return py::make_tuple(release, source);
      },
      "(release, source) of the NVIDIA kernel driver, e.g. ('535.104.05', '/proc/driver/nvidia/version'), read "
      "from /proc/driver/nvidia/version or else from NVML (dlopen'd, source 'nvml'); None when neither has it.");

  m.def(
      "build_info",
      []() {
        py::dict d;
        d["compiler"] = compiler_string();
        d["cxx_standard"] = cxx_standard();
#if defined(VLFAST_WITH_OPENMP)
        d["openmp"] = true;
#else
        d["openmp"] = false;
#endif
        d["build_type"] = std::string(VLFAST_BUILD_TYPE);
        d["pybind11"] = std::string(VLFAST_STRINGIFY(PYBIND11_VERSION_MAJOR) "." VLFAST_STRINGIFY(
            PYBIND11_VERSION_MINOR) "." VLFAST_STRINGIFY(PYBIND11_VERSION_PATCH));
#if defined(VLFAST_WITH_CUDA)
        d["cuda"] = true;
        const int v = vlfast::cuda_runtime_version_compiled();
        d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
        d["cuda_runtime_version"] = v;
        d["cuda_compiler_version"] = std::string(VLFAST_CUDA_COMPILER_VERSION);
        d["cuda_archs"] = std::string(VLFAST_CUDA_ARCHS_STR);
        d["cuda_runtime"] = std::string("static");
#else
        d["cuda"] = false;
        d["cuda_version"] = py::none();
        d["cuda_runtime_version"] = 0;
        d["cuda_compiler_version"] = py::none();
        d["cuda_archs"] = py::none();
        d["cuda_runtime"] = py::none();
#endif
        return d;
      },
      "How this module was built: compiler, cxx_standard, openmp, build_type, pybind11, cuda, cuda_version, "
      "cuda_runtime_version (CUDART_VERSION, 0 without CUDA), cuda_compiler_version, cuda_archs, cuda_runtime.");

  m.def(
      "keep_mask_cpu",
      [](uintptr_t out_ptr, int64_t n, const py::int_& seed, int64_t offset, int64_t threshold) {
        const uint32_t thr = check_keep_mask_args("keep_mask_cpu", out_ptr, n, offset, threshold);
        const uint64_t s = to_seed(seed, "keep_mask_cpu");
        py::gil_scoped_release release;
        vlfast::keep_mask_cpu(reinterpret_cast<uint8_t*>(out_ptr), n, s, offset, thr);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
      "Write out[i] = philox_keep(seed, offset + i, threshold) (0/1 bytes) for i in [0, n) into the host "
      "buffer at out_ptr (n bytes, e.g. a contiguous torch.bool tensor's data_ptr()).");

  m.def(
      "philox_u32",
      [](const py::int_& seed, const py::int_& counter) {
        const uint64_t s = to_seed(seed, "philox_u32");
        const unsigned long long c = PyLong_AsUnsignedLongLong(counter.ptr());
        if (c == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
          PyErr_Clear();
          bad_arg("philox_u32: counter must be an integer in [0, 2**64), got " +
                  py::repr(counter).cast<std::string>());
        }
        return vlfast::philox_u32(s, static_cast<uint64_t>(c));
      },
      py::arg("seed"), py::arg("counter"),
      "First output word of Philox4x32-10 with key (seed lo, seed hi) and counter (lo, hi, 0, 0); for tests.");

#if defined(VLFAST_WITH_CUDA)
  m.def(
      "keep_mask_cuda",
      [](uintptr_t out_ptr, int64_t n, const py::int_& seed, int64_t offset, int64_t threshold, uintptr_t stream) {
        const uint32_t thr = check_keep_mask_args("keep_mask_cuda", out_ptr, n, offset, threshold);
        const uint64_t s = to_seed(seed, "keep_mask_cuda");
        py::gil_scoped_release release;
        vlfast::keep_mask_cuda(reinterpret_cast<uint8_t*>(out_ptr), n, s, offset, thr, stream);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
      py::arg("stream") = 0,
      "CUDA version of keep_mask_cpu: out_ptr is device memory, stream a cudaStream_t as an integer "
      "(torch.cuda.current_stream().cuda_stream). Asynchronous; raises RuntimeError when the launch fails.");
#endif

  m.def(
      "ipot_cpu",
      [](uintptr_t cost, uintptr_t xm, uintptr_t ym, uintptr_t plan, int64_t B, int64_t Lx, int64_t Ly, double beta,
         int n_iters, int k) {
        check_ot_args("ipot_cpu", cost, xm, ym, plan, B, Lx, Ly, n_iters);
        check_positive("ipot_cpu", "beta", beta);
        if (k < 1) bad_arg("ipot_cpu: k must be >= 1, got " + std::to_string(k));
        py::gil_scoped_release release;
        vlfast::ot::ipot_cpu(reinterpret_cast<const float*>(cost), reinterpret_cast<const uint8_t*>(xm),
                             reinterpret_cast<const uint8_t*>(ym), reinterpret_cast<float*>(plan), B,
                             static_cast<int>(Lx), static_cast<int>(Ly), static_cast<float>(beta), n_iters, k);
      },
      py::arg("cost_ptr"), py::arg("x_mask_ptr"), py::arg("y_mask_ptr"), py::arg("plan_ptr"), py::arg("B"),
      py::arg("Lx"), py::arg("Ly"), py::arg("beta"), py::arg("n_iters"), py::arg("k"),
      "IPOT (UNITER's semantics) on B problems: cost (B,Lx,Ly) fp32, masks (B,Lx)/(B,Ly) bytes (nonzero = real), "
      "plan (B,Lx,Ly) fp32 written whole; host memory, OpenMP over the batch.");

  m.def(
      "sinkhorn_cpu",
      [](uintptr_t cost, uintptr_t xm, uintptr_t ym, uintptr_t plan, int64_t B, int64_t Lx, int64_t Ly, double eps,
         int n_iters, int log_mode) {
        check_ot_args("sinkhorn_cpu", cost, xm, ym, plan, B, Lx, Ly, n_iters);
        if (n_iters < 1) bad_arg("sinkhorn_cpu: n_iters must be >= 1, got " + std::to_string(n_iters));
        check_positive("sinkhorn_cpu", "eps", eps);
        check_log_mode("sinkhorn_cpu", log_mode);
        py::gil_scoped_release release;
        vlfast::ot::sinkhorn_cpu(reinterpret_cast<const float*>(cost), reinterpret_cast<const uint8_t*>(xm),
                                 reinterpret_cast<const uint8_t*>(ym), reinterpret_cast<float*>(plan), B,
                                 static_cast<int>(Lx), static_cast<int>(Ly), static_cast<float>(eps), n_iters,
                                 log_mode);
      },
      py::arg("cost_ptr"), py::arg("x_mask_ptr"), py::arg("y_mask_ptr"), py::arg("plan_ptr"), py::arg("B"),
      py::arg("Lx"), py::arg("Ly"), py::arg("eps"), py::arg("n_iters"), py::arg("log_mode"),
      "Sinkhorn (uniform marginals over real entries, POT's order) on B problems; log_mode -1 = per problem by "
      "cost range, 0 = scaling domain, 1 = log domain. Layout as ipot_cpu.");

#if defined(VLFAST_WITH_CUDA)
  m.def(
      "ot_workspace_floats",
      [](const std::string& solver, int64_t B, int64_t Lx, int64_t Ly, int device) {
        if (B < 0 || Lx < 0 || Ly < 0 || Lx > INT32_MAX || Ly > INT32_MAX)
          bad_arg("ot_workspace_floats: B, Lx, Ly must be >= 0 (Lx, Ly < 2**31)");
        return vlfast::ot::workspace_floats(solver.c_str(), B, static_cast<int>(Lx), static_cast<int>(Ly), device);
      },
      py::arg("solver"), py::arg("B"), py::arg("Lx"), py::arg("Ly"), py::arg("device"),
      "Floats of global workspace ipot_cuda/sinkhorn_cuda need (0 when a problem fits in shared memory).");

  m.def(
      "ipot_cuda",
      [](uintptr_t cost, uintptr_t xm, uintptr_t ym, uintptr_t plan, uintptr_t ws, int64_t B, int64_t Lx, int64_t Ly,
         double beta, int n_iters, int k, uintptr_t stream) {
        check_ot_args("ipot_cuda", cost, xm, ym, plan, B, Lx, Ly, n_iters);
        check_positive("ipot_cuda", "beta", beta);
        if (k < 1) bad_arg("ipot_cuda: k must be >= 1, got " + std::to_string(k));
        py::gil_scoped_release release;
        vlfast::ot::ipot_cuda(reinterpret_cast<const float*>(cost), reinterpret_cast<const uint8_t*>(xm),
                              reinterpret_cast<const uint8_t*>(ym), reinterpret_cast<float*>(plan),
                              reinterpret_cast<float*>(ws), B, static_cast<int>(Lx), static_cast<int>(Ly),
                              static_cast<float>(beta), n_iters, k, stream);
      },
      py::arg("cost_ptr"), py::arg("x_mask_ptr"), py::arg("y_mask_ptr"), py::arg("plan_ptr"),
      py::arg("workspace_ptr"), py::arg("B"), py::arg("Lx"), py::arg("Ly"), py::arg("beta"), py::arg("n_iters"),
      py::arg("k"), py::arg("stream") = 0,
      "CUDA IPOT: one launch for the batch, a thread block per problem. Device pointers; asynchronous on stream.");

  m.def(
      "sinkhorn_cuda",
      [](uintptr_t cost, uintptr_t xm, uintptr_t ym, uintptr_t plan, uintptr_t ws, int64_t B, int64_t Lx, int64_t Ly,
         double eps, int n_iters, int log_mode, uintptr_t stream) {
        check_ot_args("sinkhorn_cuda", cost, xm, ym, plan, B, Lx, Ly, n_iters);
        if (n_iters < 1) bad_arg("sinkhorn_cuda: n_iters must be >= 1, got " + std::to_string(n_iters));
        check_positive("sinkhorn_cuda", "eps", eps);
        check_log_mode("sinkhorn_cuda", log_mode);
        py::gil_scoped_release release;
        vlfast::ot::sinkhorn_cuda(reinterpret_cast<const float*>(cost), reinterpret_cast<const uint8_t*>(xm),
                                  reinterpret_cast<const uint8_t*>(ym), reinterpret_cast<float*>(plan),
                                  reinterpret_cast<float*>(ws), B, static_cast<int>(Lx), static_cast<int>(Ly),
                                  static_cast<float>(eps), n_iters, log_mode, stream);
      },
      py::arg("cost_ptr"), py::arg("x_mask_ptr"), py::arg("y_mask_ptr"), py::arg("plan_ptr"),
      py::arg("workspace_ptr"), py::arg("B"), py::arg("Lx"), py::arg("Ly"), py::arg("eps"), py::arg("n_iters"),
      py::arg("log_mode"), py::arg("stream") = 0,
      "CUDA Sinkhorn (scaling or log domain per problem): one launch for the batch. Device pointers.");
#endif
}
