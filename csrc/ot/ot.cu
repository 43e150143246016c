// CUDA batched OT: one launch solves the whole batch, one thread block per problem,
// every iteration inside the kernel.  A problem's tiles (IPOT: A and Q; Sinkhorn: K or
// the cost) and its scaling vectors live in shared memory when they fit (up to the
// device's opt-in limit), else in a global workspace.  Tiles use an odd leading
// dimension, so both access patterns -- a thread per column (consecutive addresses)
// and a thread per row (stride ld) -- are free of bank conflicts.  The math is
// ot_math.cuh, shared with the CPU driver.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "ot.h"
#include "ot_math.cuh"

namespace vlfast {
namespace ot {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kScratch = 4 * kWarps + 4;  // block reductions: 4 quantities x warps, then 4 results

int leading_dim(int Ly) { return Ly | 1; }  // odd

int64_t problem_floats(int Lx, int Ly, int tiles) {
  return static_cast<int64_t>(Lx) + Ly + static_cast<int64_t>(tiles) * Lx * leading_dim(Ly);
}

int tiles_of(const char* solver) {
  if (std::strcmp(solver, "ipot") == 0) return 2;
  if (std::strcmp(solver, "sinkhorn") == 0) return 1;
  throw std::invalid_argument(std::string("vlfast._C.ot_workspace_floats: solver must be 'ipot' or 'sinkhorn', got '") +
                              solver + "'");
}

int max_smem_bytes(int device, const char* fn) {
  int v = 0;
  cuda_check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), fn,
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return v;
}

// Shared memory of a problem whose tiles sit in shared memory.
int64_t smem_bytes_in_smem(int Lx, int Ly, int tiles) {
  return (kScratch + problem_floats(Lx, Ly, tiles)) * static_cast<int64_t>(sizeof(float));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct Stats {
  float nx, ny, cmin, cmax;
};

// Real counts and the real cost range of one problem, broadcast to the whole block.
__device__ Stats block_stats(const float* __restrict__ C, const uint8_t* __restrict__ X,
                             const uint8_t* __restrict__ Y, int Lx, int Ly, float* red) {
  float cx = 0.0f, cy = 0.0f, mn = FLT_MAX, mx = -FLT_MAX;
  for (int i = threadIdx.x; i < Lx; i += blockDim.x) cx += X[i] != 0 ? 1.0f : 0.0f;
  for (int j = threadIdx.x; j < Ly; j += blockDim.x) cy += Y[j] != 0 ? 1.0f : 0.0f;
  const int64_t n = static_cast<int64_t>(Lx) * Ly;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
    if (X[i] && Y[j]) {
      const float c = C[e];
      mn = fminf(mn, c);
      mx = fmaxf(mx, c);
    }
  }
  cx = warp_sum(cx);
  cy = warp_sum(cy);
  mn = warp_min(mn);
  mx = warp_max(mx);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red[warp] = cx;
    red[kWarps + warp] = cy;
    red[2 * kWarps + warp] = mn;
    red[3 * kWarps + warp] = mx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.0f, b = 0.0f, lo = FLT_MAX, hi = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) {
      a += red[w];
      b += red[kWarps + w];
      lo = fminf(lo, red[2 * kWarps + w]);
      hi = fmaxf(hi, red[3 * kWarps + w]);
    }
    red[4 * kWarps] = a;
    red[4 * kWarps + 1] = b;
    red[4 * kWarps + 2] = lo;
    red[4 * kWarps + 3] = hi;
  }
  __syncthreads();
  return Stats{red[4 * kWarps], red[4 * kWarps + 1], red[4 * kWarps + 2], red[4 * kWarps + 3]};
}

__device__ void zero_plan(float* __restrict__ P, int64_t n) {
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) P[e] = 0.0f;
}

// Per-problem storage: [rows (Lx) | cols (Ly) | tile 0 (Lx x ld) | tile 1 ...].
__device__ float* problem_base(float* smem, float* ws, int in_smem, int Lx, int Ly, int ld, int tiles) {
  if (in_smem) return smem + kScratch;
  const int64_t per = static_cast<int64_t>(Lx) + Ly + static_cast<int64_t>(tiles) * Lx * ld;
  return ws + static_cast<int64_t>(blockIdx.x) * per;
}

__global__ void __launch_bounds__(kThreads)
    ipot_kernel(const float* __restrict__ cost, const uint8_t* __restrict__ xm, const uint8_t* __restrict__ ym,
                float* __restrict__ plan, float* __restrict__ ws, int Lx, int Ly, int ld, float beta, int n_iters,
                int k, int in_smem) {
  extern __shared__ float smem[];
  const int64_t tile = static_cast<int64_t>(Lx) * Ly;
  const float* C = cost + blockIdx.x * tile;
  const uint8_t* X = xm + static_cast<int64_t>(blockIdx.x) * Lx;
  const uint8_t* Y = ym + static_cast<int64_t>(blockIdx.x) * Ly;
  float* P = plan + blockIdx.x * tile;
  float* s = problem_base(smem, ws, in_smem, Lx, Ly, ld, 2);
  float* d = s + Lx;
  float* A = d + Ly;
  float* Q = A + static_cast<int64_t>(Lx) * ld;

  const Stats st = block_stats(C, X, Y, Lx, Ly, smem);
  if (st.nx == 0.0f || st.ny == 0.0f) {
    zero_plan(P, tile);
    return;
  }
  const float inv_beta = 1.0f / beta;
  for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
    const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
    const float a = kernel_entry(C[e], st.cmin, inv_beta, X[i] && Y[j]);
    A[static_cast<int64_t>(i) * ld + j] = a;
    Q[static_cast<int64_t>(i) * ld + j] = a;
  }
  for (int i = threadIdx.x; i < Lx; i += blockDim.x) s[i] = X[i] ? 1.0f / st.nx : 0.0f;
  __syncthreads();
  if (n_iters == 0) {
    for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
      const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
      P[e] = (X[i] && Y[j]) ? 1.0f : 0.0f;
    }
    return;
  }
  for (int t = 0; t < n_iters; ++t) {
    for (int kk = 0; kk < k; ++kk) {
      for (int j = threadIdx.x; j < Ly; j += blockDim.x) {
        float dot;
        col_dots(Q, ld, s, Lx, j, j + 1, &dot);
        d[j] = ipot_scaling(dot, st.ny, Y[j] != 0);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < Lx; i += blockDim.x) {
        s[i] = ipot_scaling(row_dot(Q + static_cast<int64_t>(i) * ld, d, Ly), st.nx, X[i] != 0);
      }
      __syncthreads();
    }
    if (t + 1 < n_iters) {
      for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
        const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
        const int64_t q = static_cast<int64_t>(i) * ld + j;
        Q[q] = ipot_next_q(Q[q], A[q], s[i], d[j]);
      }
      __syncthreads();
    }
  }
  for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
    const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
    P[e] = (X[i] && Y[j]) ? scaled_entry(Q[static_cast<int64_t>(i) * ld + j], s[i], d[j]) : 0.0f;
  }
}

__global__ void __launch_bounds__(kThreads)
    sinkhorn_kernel(const float* __restrict__ cost, const uint8_t* __restrict__ xm, const uint8_t* __restrict__ ym,
                    float* __restrict__ plan, float* __restrict__ ws, int Lx, int Ly, int ld, float eps, int n_iters,
                    int log_mode, int in_smem) {
  extern __shared__ float smem[];
  const int64_t tile = static_cast<int64_t>(Lx) * Ly;
  const float* C = cost + blockIdx.x * tile;
  const uint8_t* X = xm + static_cast<int64_t>(blockIdx.x) * Lx;
  const uint8_t* Y = ym + static_cast<int64_t>(blockIdx.x) * Ly;
  float* P = plan + blockIdx.x * tile;
  float* u = problem_base(smem, ws, in_smem, Lx, Ly, ld, 1);  // u, or the potential f
  float* v = u + Lx;                                          // v, or the potential g
  float* K = v + Ly;                                          // K, or the cost with padding zeroed

  const Stats st = block_stats(C, X, Y, Lx, Ly, smem);
  if (st.nx == 0.0f || st.ny == 0.0f) {
    zero_plan(P, tile);
    return;
  }
  const float inv_eps = 1.0f / eps, a = 1.0f / st.nx, b = 1.0f / st.ny;
  const bool log_domain = use_log_domain(log_mode, st.cmin, st.cmax, eps);  // uniform over the block

  for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
    const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
    const bool real = X[i] && Y[j];
    K[static_cast<int64_t>(i) * ld + j] =
        log_domain ? (real ? C[e] : 0.0f) : kernel_entry(C[e], st.cmin, inv_eps, real);
  }
  const float log_a = logf(a), log_b = logf(b);
  for (int i = threadIdx.x; i < Lx; i += blockDim.x) u[i] = X[i] ? (log_domain ? eps * log_a : a) : (log_domain ? -INFINITY : 0.0f);
  for (int j = threadIdx.x; j < Ly; j += blockDim.x) v[j] = log_domain ? -INFINITY : (Y[j] ? b : 0.0f);
  __syncthreads();

  for (int t = 0; t < n_iters; ++t) {
    for (int j = threadIdx.x; j < Ly; j += blockDim.x) {
      if (log_domain) {
        v[j] = log_potential(log_b, col_lse(K, ld, u, Lx, j, inv_eps), eps, Y[j] != 0);
      } else {
        float dot;
        col_dots(K, ld, u, Lx, j, j + 1, &dot);
        v[j] = sinkhorn_scaling(b, dot, Y[j] != 0);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < Lx; i += blockDim.x) {
      const float* row = K + static_cast<int64_t>(i) * ld;
      u[i] = log_domain ? log_potential(log_a, row_lse(row, v, Ly, inv_eps), eps, X[i] != 0)
                        : sinkhorn_scaling(a, row_dot(row, v, Ly), X[i] != 0);
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < tile; e += blockDim.x) {
    const int i = static_cast<int>(e / Ly), j = static_cast<int>(e - static_cast<int64_t>(i) * Ly);
    const bool real = X[i] && Y[j];
    const float kv = K[static_cast<int64_t>(i) * ld + j];
    P[e] = log_domain ? log_plan_entry(u[i], v[j], kv, inv_eps, real) : (real ? scaled_entry(kv, u[i], v[j]) : 0.0f);
  }
}

// Shared-memory placement of a launch: (in_smem, dynamic shared bytes).
struct Placement {
  int in_smem;
  int64_t smem_bytes;
};

Placement place(int Lx, int Ly, int tiles, int device, const char* fn) {
  const int64_t full = smem_bytes_in_smem(Lx, Ly, tiles);
  if (full <= max_smem_bytes(device, fn)) return Placement{1, full};
  return Placement{0, static_cast<int64_t>(kScratch) * static_cast<int64_t>(sizeof(float))};
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes, const char* fn) {
  if (bytes > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               fn, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

}  // namespace

int64_t workspace_floats(const char* solver, int64_t B, int Lx, int Ly, int device) {
  const int tiles = tiles_of(solver);
  if (B <= 0 || Lx <= 0 || Ly <= 0) return 0;
  const Placement pl = place(Lx, Ly, tiles, device, "vlfast._C.ot_workspace_floats");
  return pl.in_smem ? 0 : B * problem_floats(Lx, Ly, tiles);
}

void ipot_cuda(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, float* workspace,
               int64_t B, int Lx, int Ly, float beta, int n_iters, int k, uintptr_t stream) {
  constexpr const char* kFn = "vlfast._C.ipot_cuda";
  if (B <= 0 || Lx <= 0 || Ly <= 0) return;
  PointerDeviceGuard guard(plan, kFn, "plan_ptr");
  const Placement pl = place(Lx, Ly, 2, guard.device(), kFn);
  if (!pl.in_smem && workspace == nullptr)
    throw std::invalid_argument(std::string(kFn) + ": the tiles do not fit in shared memory and workspace_ptr is null "
                                "(allocate ot_workspace_floats('ipot', B, Lx, Ly, device) floats)");
  set_smem(ipot_kernel, pl.smem_bytes, kFn);
  ipot_kernel<<<static_cast<unsigned int>(B), kThreads, static_cast<size_t>(pl.smem_bytes),
                reinterpret_cast<cudaStream_t>(stream)>>>(cost, x_mask, y_mask, plan, workspace, Lx, Ly,
                                                         leading_dim(Ly), beta, n_iters, k, pl.in_smem);
  cuda_check_launch(kFn, "ipot_kernel");
}

void sinkhorn_cuda(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, float* workspace,
                   int64_t B, int Lx, int Ly, float eps, int n_iters, int log_mode, uintptr_t stream) {
  constexpr const char* kFn = "vlfast._C.sinkhorn_cuda";
  if (B <= 0 || Lx <= 0 || Ly <= 0) return;
  PointerDeviceGuard guard(plan, kFn, "plan_ptr");
  const Placement pl = place(Lx, Ly, 1, guard.device(), kFn);
  if (!pl.in_smem && workspace == nullptr)
    throw std::invalid_argument(std::string(kFn) + ": the tiles do not fit in shared memory and workspace_ptr is null "
                                "(allocate ot_workspace_floats('sinkhorn', B, Lx, Ly, device) floats)");
  set_smem(sinkhorn_kernel, pl.smem_bytes, kFn);
  sinkhorn_kernel<<<static_cast<unsigned int>(B), kThreads, static_cast<size_t>(pl.smem_bytes),
                    reinterpret_cast<cudaStream_t>(stream)>>>(cost, x_mask, y_mask, plan, workspace, Lx, Ly,
                                                             leading_dim(Ly), eps, n_iters, log_mode, pl.in_smem);
  cuda_check_launch(kFn, "sinkhorn_kernel");
}

}  // namespace ot
}  // namespace vlfast
